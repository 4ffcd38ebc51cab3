-- The browser and OS families from the User-Agent at ingest (app/ingest/enrich.py, the same
-- parse as the device class); NULL for events stored before them and for unknown agents.
-- The User-Agent itself is not stored.
ALTER TABLE events ADD COLUMN browser text, ADD COLUMN os text;
