-- The visitor's country (ISO 3166-1 alpha-2, from the client IP at ingest: app/ingest/geo.py);
-- NULL for events stored before it, and for addresses no country is known for. The IP itself
-- is never stored.
ALTER TABLE events ADD COLUMN country text;
