"""The ingest role: validate, enrich, commit, acknowledge, hand over for publication."""
