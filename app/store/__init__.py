"""Events, sites and salts in PostgreSQL: the durable truth."""
