"""Moving committed events from ingest to gateways (app.broker.base has the interface)."""
