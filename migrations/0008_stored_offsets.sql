-- The duplicate lookup of a large commit (app/store/writes.py, the COPY path) as a function:
-- the offsets of events already stored, by (site, client event id). Ingest asks the function
-- rather than a table, so where the answer is kept can change under running replicas: here,
-- the events table's UNIQUE (site, event_id); 0009 moves it to the dedup table `event_ids`,
-- replacing this body in the transaction that partitions `events` (docs/decisions.md,
-- "The events table partitioned by month"). Same signature forever, as for
-- sitewire_store_rows: replicas of the previous release keep calling it during a rollout.
-- STABLE and a single SELECT, so PostgreSQL inlines it into the caller's plan.
CREATE FUNCTION sitewire_stored_offsets(p_site text[], p_event_id uuid[])
RETURNS TABLE (site text, event_id uuid, site_offset bigint)
LANGUAGE sql STABLE AS $$
    SELECT e.site, e.event_id, e.site_offset
    FROM events e JOIN unnest(p_site, p_event_id) AS k(site, event_id) USING (site, event_id)
$$;
