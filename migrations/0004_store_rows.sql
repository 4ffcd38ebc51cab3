-- The small commit (app/store/writes.py, `commit`) as a function that takes whole rows: a JSON
-- array of objects keyed by column name, filled into the events table's own row type. Adding a
-- column to events (one migration) changes neither this signature nor its body, where
-- sitewire_store_events (0003) named every column in both. It does what 0003's does: lock the
-- sites in id order, skip (site, event_id) pairs already stored, give each new event its site's
-- next offset, insert, advance next_offset; one row out per row in, in order (epoch NULL: no
-- such site). sitewire_store_events stays for replicas still running the previous release;
-- a later migration drops it.
CREATE FUNCTION sitewire_store_rows(p_rows jsonb, p_minted boolean[])
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
    s record;
    r events;
    v_next bigint;
    v_prior bigint;
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
        FOR i IN 1 .. n LOOP
            r := v_rows[i];
            CONTINUE WHEN r.site IS DISTINCT FROM s.id;
            out_epoch[i] := s.epoch;
            IF p_minted[i] IS NOT TRUE THEN
                -- Sees this transaction's own inserts too: a repeat within the call is found.
                SELECT e.site_offset INTO v_prior FROM events e
                WHERE e.site = s.id AND e.event_id = r.event_id;
                IF FOUND THEN
                    out_offset[i] := v_prior;
                    out_duplicate[i] := true;
                    CONTINUE;
                END IF;
            END IF;
            r.site_offset := v_next;
            INSERT INTO events SELECT (r).*;
            out_offset[i] := v_next;
            v_next := v_next + 1;
        END LOOP;
        IF v_next <> s.next_offset THEN
            UPDATE sites SET next_offset = v_next WHERE sites.id = s.id;
        END IF;
    END LOOP;
    RETURN QUERY
        SELECT u.e, u.o, u.d FROM unnest(out_epoch, out_offset, out_duplicate)
            WITH ORDINALITY AS u(e, o, d, i)
        ORDER BY u.i;
END
$$;
