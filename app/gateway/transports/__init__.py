"""How viewers connect: one module per transport."""
