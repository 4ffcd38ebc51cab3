-- `events` partitioned by month of `ts`, so that retention drops whole partitions instead of
-- deleting rows (bloat, vacuum), and each partition's indexes stay the size of a month.
-- Design, costs and what was rejected: docs/decisions.md, "The events table partitioned by
-- month"; operations: docs/operations.md, "Retention".
--
-- * Every unique index of a partitioned table must contain the partition key, and a retry has
--   a new ts, so UNIQUE (site, event_id) cannot stay on `events`. Retries are recognised in
--   `event_ids` instead: (site, event_id) -> (site_offset, ts), partitioned by day and kept
--   for the retry window (at least 48 hours: app/store/partitions.py drops older days). A
--   statement trigger on `events` fills it in the commit's own transaction, whatever wrote
--   the rows (the function below, COPY, or a replica of the previous release). Lookups run
--   under the site's row lock, as before, so they are race-free; each day's primary key is
--   the backstop that the old UNIQUE (site, event_id) was.
-- * No unique index on the parent: each partition has its own PRIMARY KEY (site, site_offset),
--   stronger than a parent-wide (site, site_offset, ts) would be, and readers by offset use it
--   in every partition (a Merge Append). Offsets are unique by construction (site row lock).
-- * No DEFAULT partition: rows in it would make attaching their month scan and move them, and
--   it forbids DETACH ... CONCURRENTLY. Partitions are made ahead by `sitewire worker`, here
--   for this month and the next, and by ingest on demand when a commit finds one missing.
--
-- Online, while ingest commits (tested with ingest running through it): an existing table
-- becomes the first partition, `events_legacy` (FROM MINVALUE TO the first month boundary at
-- least 7 days away), without rewriting or re-indexing it. Each "-- step:" runs in its own
-- transaction (app/store/migrate.py) under a 500 ms lock timeout, retried, so no step queues
-- ingest behind it for longer; a run stopped half-way is run again from its first step, and
-- every step first checks whether its work is done. An empty table (a new install) is simply
-- replaced.

-- step: partition helpers and the dedup table
-- Partitions of a parent with their bounds (NULL: MINVALUE/MAXVALUE), oldest first. Bounds are
-- read back from PostgreSQL's own text for them, in the caller's session, so they round-trip.
CREATE OR REPLACE FUNCTION sitewire_partitions(p_parent regclass)
RETURNS TABLE (name text, lower_bound timestamptz, upper_bound timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT c.relname::text,
           CASE WHEN b[1] = 'MINVALUE' THEN NULL ELSE btrim(b[1], '''')::timestamptz END,
           CASE WHEN b[2] = 'MAXVALUE' THEN NULL ELSE btrim(b[2], '''')::timestamptz END
    FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid
    CROSS JOIN LATERAL regexp_match(
        pg_get_expr(c.relpartbound, c.oid), '^FOR VALUES FROM \((.+)\) TO \((.+)\)$') AS b
    WHERE i.inhparent = p_parent AND b IS NOT NULL
    ORDER BY 2 NULLS FIRST
$$;

-- Makes the partitions of `events` (months, UTC) or `event_ids` (days, UTC) that cover
-- p_from..p_to and do not exist yet; returns how many it made. Used by the worker (ahead of
-- time), by ingest (a commit that found none: the worker was late or a clock is off) and here.
-- Each is created alone and then attached: ATTACH takes SHARE UPDATE EXCLUSIVE on the parent,
-- which does not wait for (or block) inserts and reads, where CREATE TABLE ... PARTITION OF
-- would take ACCESS EXCLUSIVE. A period that overlaps an existing partition (events_legacy)
-- is left alone.
CREATE OR REPLACE FUNCTION sitewire_create_partitions(
    p_parent text, p_from timestamptz, p_to timestamptz
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_unit text := CASE p_parent WHEN 'events' THEN 'month' WHEN 'event_ids' THEN 'day' END;
    v_key text := CASE p_parent
        WHEN 'events' THEN 'site, site_offset' WHEN 'event_ids' THEN 'site, event_id' END;
    v_suffix text := CASE p_parent WHEN 'events' THEN 'YYYY_MM' ELSE 'YYYY_MM_DD' END;
    v_lower timestamp;  -- UTC
    v_upper timestamp;
    v_name text;
    v_made integer := 0;
BEGIN
    IF v_unit IS NULL THEN
        RAISE EXCEPTION 'sitewire_create_partitions: % is not a partitioned Sitewire table',
            p_parent;
    END IF;
    -- One creator at a time: several ingest replicas may find the same partition missing.
    PERFORM pg_advisory_xact_lock(hashtext('sitewire_create_partitions'));
    v_lower := date_trunc(v_unit, p_from AT TIME ZONE 'UTC');
    WHILE v_lower <= p_to AT TIME ZONE 'UTC' LOOP
        v_upper := v_lower + ('1 ' || v_unit)::interval;
        IF NOT EXISTS (
            SELECT 1 FROM sitewire_partitions(p_parent::regclass) p
            WHERE coalesce(p.lower_bound, '-infinity') < v_upper AT TIME ZONE 'UTC'
              AND coalesce(p.upper_bound, 'infinity') > v_lower AT TIME ZONE 'UTC'
        ) THEN
            v_name := p_parent || '_' || to_char(v_lower, v_suffix);
            EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS)', v_name, p_parent);
            EXECUTE format('ALTER TABLE %I ADD PRIMARY KEY (%s)', v_name, v_key);
            EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                           p_parent, v_name,
                           v_lower AT TIME ZONE 'UTC', v_upper AT TIME ZONE 'UTC');
            v_made := v_made + 1;
        END IF;
        v_lower := v_upper;
    END LOOP;
    RETURN v_made;
END
$$;

-- The retry window's lookup table: one row per stored event, dropped by day.
CREATE TABLE IF NOT EXISTS event_ids (
    site        text NOT NULL,
    event_id    uuid NOT NULL,
    site_offset bigint NOT NULL,
    ts          timestamptz NOT NULL
) PARTITION BY RANGE (ts);
SELECT sitewire_create_partitions('event_ids', now() - interval '3 days', now() + interval '2 days');

CREATE OR REPLACE FUNCTION sitewire_record_event_ids() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO event_ids (site, event_id, site_offset, ts)
    SELECT n.site, n.event_id, n.site_offset, n.ts FROM new_events n;
    RETURN NULL;
END
$$;

-- From here on every new event gets its entry (the old table's rows of the last two days get
-- theirs in the next step). Creating the trigger takes SHARE ROW EXCLUSIVE on events: it waits
-- for the commits in flight, for at most the lock timeout.
DO $$
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = 'events'::regclass) = 'r'
       AND NOT EXISTS (SELECT 1 FROM pg_trigger
                       WHERE tgrelid = 'events'::regclass AND tgname = 'events_record_ids') THEN
        CREATE TRIGGER events_record_ids AFTER INSERT ON events
        REFERENCING NEW TABLE AS new_events
        FOR EACH STATEMENT EXECUTE FUNCTION sitewire_record_event_ids();
    END IF;
END
$$;

-- Copies the entries of the events stored in the retry window before the trigger existed,
-- site by site in batches of p_batch offsets, committing after each (so no long transaction
-- and no lock beyond reads of events and inserts into event_ids).
CREATE OR REPLACE PROCEDURE sitewire_backfill_event_ids(p_since timestamptz, p_batch integer)
LANGUAGE plpgsql AS $$
DECLARE
    s record;
    v_after bigint;
    v_last bigint;
    v_first timestamptz;
    v_newest timestamptz;
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = 'events'::regclass) <> 'r' THEN
        RETURN;  -- already partitioned: done in an earlier run
    END IF;
    FOR s IN SELECT id FROM sites ORDER BY id LOOP
        -- Offsets follow ts closely (docs/operations.md), so the window starts near here.
        SELECT min(e.site_offset) - 1 INTO v_after FROM events e
        WHERE e.site = s.id AND e.ts >= p_since;
        CONTINUE WHEN v_after IS NULL;
        LOOP
            SELECT max(b.site_offset), min(b.ts), max(b.ts) INTO v_last, v_first, v_newest
            FROM (SELECT e.site_offset, e.ts FROM events e
                  WHERE e.site = s.id AND e.site_offset > v_after
                  ORDER BY e.site_offset LIMIT p_batch) b;
            EXIT WHEN v_last IS NULL;
            PERFORM sitewire_create_partitions('event_ids', greatest(v_first, p_since), v_newest);
            INSERT INTO event_ids (site, event_id, site_offset, ts)
            SELECT e.site, e.event_id, e.site_offset, e.ts FROM events e
            WHERE e.site = s.id AND e.site_offset > v_after AND e.site_offset <= v_last
              AND e.ts >= p_since
            ON CONFLICT DO NOTHING;  -- stored since the trigger: it wrote the entry
            COMMIT;
            v_after := v_last;
        END LOOP;
    END LOOP;
END
$$;

-- The upper bound of the old table's range, read back from the constraint that enforces it
-- (so the two cannot disagree); NULL before the next step made it.
CREATE OR REPLACE FUNCTION sitewire_legacy_bound() RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT substring(pg_get_constraintdef(c.oid) FROM '''([^'']+)''')::timestamptz
    FROM pg_constraint c
    WHERE c.conrelid = 'events'::regclass AND c.conname = 'events_before_partitions'
$$;

-- step: entries for the events of the last 48 hours (outside a transaction)
CALL sitewire_backfill_event_ids(now() - interval '48 hours', 10000);

-- step: the old table's time range
-- CHECK (ts < bound) added NOT VALID (instant: existing rows are not read, new ones are
-- checked), validated in the next step without blocking writes, so that ATTACH trusts it
-- instead of scanning the table under its ACCESS EXCLUSIVE lock. The bound is the first month
-- boundary at least 7 days away (and after every stored ts): new rows keep going to the old
-- table until then. Rows at or after it are refused until the table is attached, so a
-- constraint whose bound is less than a day away (a run stopped at this point and resumed
-- late) is made again with a later one.
DO $$
DECLARE
    v_bound timestamptz;
    v_newest timestamptz;
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = 'events'::regclass) <> 'r' THEN
        RETURN;
    END IF;
    v_bound := sitewire_legacy_bound();
    IF v_bound > now() + interval '1 day' THEN
        RETURN;
    ELSIF v_bound IS NOT NULL THEN
        ALTER TABLE events DROP CONSTRAINT events_before_partitions;
    END IF;
    -- The newest ts, one index probe per site (the (site, ts) index).
    SELECT max(m.ts) INTO v_newest FROM sites s
    CROSS JOIN LATERAL (SELECT max(e.ts) AS ts FROM events e WHERE e.site = s.id) m;
    v_bound := (date_trunc('month', greatest(now() + interval '7 days', v_newest)
                                    AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC';
    EXECUTE format('ALTER TABLE events ADD CONSTRAINT events_before_partitions '
                   'CHECK (ts < %L) NOT VALID', v_bound);
END
$$;

-- step: validate the old table's range
-- VALIDATE reads every row under SHARE UPDATE EXCLUSIVE: inserts and reads go on meanwhile.
DO $$
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = 'events'::regclass) = 'r'
       AND NOT (SELECT convalidated FROM pg_constraint
                WHERE conrelid = 'events'::regclass AND conname = 'events_before_partitions')
    THEN
        ALTER TABLE events VALIDATE CONSTRAINT events_before_partitions;
    END IF;
END
$$;

-- step: swap in the partitioned table
-- One short transaction: ACCESS EXCLUSIVE on the old table (waiting for the commits in flight,
-- for at most the lock timeout), then catalog changes only: rename it, create the partitioned
-- `events` with its columns, attach the old table as its first partition (no scan: the
-- validated CHECK proves the bound; its (site, ts) index becomes the parent index's; no index
-- is built), make the next two months, move the trigger, and switch both store functions to
-- `event_ids`. Statements waiting on the old table find the new `events` by name when they get
-- the lock; cached plans are re-planned.
DO $$
DECLARE
    v_bound timestamptz;
    v_empty boolean;
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = 'events'::regclass) <> 'r' THEN
        RETURN;
    END IF;
    LOCK TABLE events IN ACCESS EXCLUSIVE MODE;
    v_bound := sitewire_legacy_bound();
    IF v_bound IS NULL OR v_bound <= now() + interval '1 hour' THEN
        RAISE EXCEPTION 'events_before_partitions is missing or ends too soon (%): run the '
                        'migration again', v_bound;
    END IF;
    v_empty := NOT EXISTS (SELECT 1 FROM events);
    ALTER TABLE events RENAME TO events_legacy;
    ALTER INDEX events_pkey RENAME TO events_legacy_pkey;
    ALTER INDEX events_site_event_id_key RENAME TO events_legacy_site_event_id_key;
    ALTER INDEX events_site_ts RENAME TO events_legacy_site_ts;
    DROP TRIGGER events_record_ids ON events_legacy;
    CREATE TABLE events (LIKE events_legacy INCLUDING DEFAULTS) PARTITION BY RANGE (ts);
    -- History by time, retention of the old table, the site-delete trigger: on every partition.
    CREATE INDEX events_site_ts ON events (site, ts);
    IF v_empty THEN  -- a new install: no old table to keep
        DROP TABLE events_legacy;
        PERFORM sitewire_create_partitions('events', now(), now() + interval '1 month');
    ELSE
        EXECUTE format('ALTER TABLE events ATTACH PARTITION events_legacy '
                       'FOR VALUES FROM (MINVALUE) TO (%L)', v_bound);
        PERFORM sitewire_create_partitions('events', v_bound, v_bound + interval '1 month');
    END IF;
    CREATE TRIGGER events_record_ids AFTER INSERT ON events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION sitewire_record_event_ids();
END
$$;

-- Retries are now looked up in event_ids (the window), for both commit paths.
CREATE OR REPLACE FUNCTION sitewire_stored_offsets(p_site text[], p_event_id uuid[])
RETURNS TABLE (site text, event_id uuid, site_offset bigint)
LANGUAGE sql STABLE AS $$
    SELECT d.site, d.event_id, d.site_offset
    FROM event_ids d JOIN unnest(p_site, p_event_id) AS k(site, event_id) USING (site, event_id)
$$;

-- The small commit, same signature and results as 0004's (replicas of the previous release
-- call it too). What changed: retries are looked up once per site through
-- sitewire_stored_offsets, and the new rows are inserted in one statement at the end (the
-- entry trigger then runs once per call, not once per row). A repeat within the call is
-- found in the offsets collected so far.
CREATE OR REPLACE FUNCTION sitewire_store_rows(p_rows jsonb, p_minted boolean[])
RETURNS TABLE (epoch text, site_offset bigint, duplicate boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_rows events[] := ARRAY(
        SELECT jsonb_populate_record(NULL::events, a.e)
        FROM jsonb_array_elements(p_rows) WITH ORDINALITY AS a(e, i) ORDER BY a.i
    );
    n integer := coalesce(array_length(v_rows, 1), 0);
    out_epoch text[] := array_fill(NULL::text, ARRAY[n]);
    out_offset bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    out_duplicate boolean[] := array_fill(false, ARRAY[n]);
    v_new events[] := '{}';
    v_ids uuid[];
    v_offsets bigint[];
    v_at integer;
    s record;
    r events;
    v_next bigint;
BEGIN
    IF coalesce(array_length(p_minted, 1), 0) <> n THEN
        RAISE EXCEPTION 'sitewire_store_rows: % rows but % minted flags',
            n, coalesce(array_length(p_minted, 1), 0);
    END IF;
    FOR s IN
        SELECT sites.id, sites.epoch, sites.next_offset FROM sites
        WHERE sites.id = ANY (ARRAY(SELECT x.site FROM unnest(v_rows) AS x))
        ORDER BY sites.id FOR UPDATE
    LOOP
        v_next := s.next_offset;
        -- This site's client ids already stored, under its lock (race-free).
        v_ids := ARRAY(SELECT (v_rows[i]).event_id FROM generate_subscripts(v_rows, 1) AS i
                       WHERE (v_rows[i]).site = s.id AND p_minted[i] IS NOT TRUE);
        v_offsets := '{}';
        IF cardinality(v_ids) > 0 THEN  -- server-minted ids are new: nothing to look up
            SELECT coalesce(array_agg(k.event_id), '{}'),
                   coalesce(array_agg(k.site_offset), '{}')
            INTO v_ids, v_offsets
            FROM sitewire_stored_offsets(array_fill(s.id, ARRAY[cardinality(v_ids)]), v_ids) k;
        END IF;
        FOR i IN 1 .. n LOOP
            r := v_rows[i];
            CONTINUE WHEN r.site IS DISTINCT FROM s.id;
            out_epoch[i] := s.epoch;
            IF p_minted[i] IS NOT TRUE THEN
                v_at := array_position(v_ids, r.event_id);
                IF v_at IS NOT NULL THEN
                    out_offset[i] := v_offsets[v_at];
                    out_duplicate[i] := true;
                    CONTINUE;
                END IF;
                v_ids := v_ids || r.event_id;
                v_offsets := v_offsets || v_next;
            END IF;
            r.site_offset := v_next;
            v_new := v_new || r;
            out_offset[i] := v_next;
            v_next := v_next + 1;
        END LOOP;
        IF v_next <> s.next_offset THEN
            UPDATE sites SET next_offset = v_next WHERE sites.id = s.id;
        END IF;
    END LOOP;
    IF cardinality(v_new) > 0 THEN
        INSERT INTO events SELECT * FROM unnest(v_new);
    END IF;
    RETURN QUERY
        SELECT u.e, u.o, u.d FROM unnest(out_epoch, out_offset, out_duplicate)
            WITH ORDINALITY AS u(e, o, d, i)
        ORDER BY u.i;
END
$$;

-- step: drop what only this migration needed, and 0003's function
DROP PROCEDURE IF EXISTS sitewire_backfill_event_ids(timestamptz, integer);
DROP FUNCTION IF EXISTS sitewire_legacy_bound();
-- Kept by 0004 for replicas two releases back; it looks retries up in `events` by (site,
-- event_id), which no month has an index for any more.
DROP FUNCTION IF EXISTS sitewire_store_events(
    text[], uuid[], boolean[], text[], text[], text[], text[], text[], jsonb[], bigint[],
    text[], timestamptz[]);
