"""HTTP plumbing both roles share: request bounds, error responses, health, static files."""
