-- One group commit of a few events in one round trip (app/store.py, `commit`). It does what the
-- COPY path does in five: lock the sites in id order, skip (site, event_id) pairs already
-- stored, give each new event its site's next offset, insert, advance next_offset. Called
-- outside an explicit transaction, so the statement's own transaction commits it.
-- Returns one row per input event, in input order: epoch NULL means the site does not exist.
-- A later change to the arguments or result needs a new function name: migrations run before
-- the new code is rolled out, and replicas still running would call the old signature.
CREATE FUNCTION sitewire_store_events(
    p_site text[], p_event_id uuid[], p_minted boolean[], p_name text[], p_url text[],
    p_path text[], p_referrer text[], p_referrer_host text[], p_props jsonb[],
    p_visitor_id bigint[], p_device text[], p_ts timestamptz[]
) RETURNS TABLE (epoch text, site_offset bigint, duplicate boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    n integer := coalesce(array_length(p_site, 1), 0);
    out_epoch text[] := array_fill(NULL::text, ARRAY[n]);
    out_offset bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    out_duplicate boolean[] := array_fill(false, ARRAY[n]);
    s record;
    v_next bigint;
    v_prior bigint;
BEGIN
    IF array_length(p_event_id, 1) IS DISTINCT FROM array_length(p_site, 1) THEN
        RAISE EXCEPTION 'sitewire_store_events: arrays of different lengths';
    END IF;
    FOR s IN
        SELECT sites.id, sites.epoch, sites.next_offset FROM sites
        WHERE sites.id = ANY (p_site) ORDER BY sites.id FOR UPDATE
    LOOP
        v_next := s.next_offset;
        FOR i IN 1 .. n LOOP
            CONTINUE WHEN p_site[i] IS DISTINCT FROM s.id;
            out_epoch[i] := s.epoch;
            IF p_minted[i] IS NOT TRUE THEN
                -- Sees this transaction's own inserts too: a repeat within the call is found.
                SELECT e.site_offset INTO v_prior FROM events e
                WHERE e.site = s.id AND e.event_id = p_event_id[i];
                IF FOUND THEN
                    out_offset[i] := v_prior;
                    out_duplicate[i] := true;
                    CONTINUE;
                END IF;
            END IF;
            INSERT INTO events (site, site_offset, event_id, name, url, path, referrer,
                                referrer_host, props, visitor_id, device, ts)
            VALUES (s.id, v_next, p_event_id[i], p_name[i], p_url[i], p_path[i],
                    p_referrer[i], p_referrer_host[i], p_props[i], p_visitor_id[i],
                    p_device[i], p_ts[i]);
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
