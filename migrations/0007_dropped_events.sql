-- Events dropped on purpose (bots, automation, no user agent: a 202 that stores nothing),
-- counted per site, UTC day and reason, so a site owner can see them (`sitewire sites stats`).
-- Ingest adds its counts every few seconds; the retention worker removes old days.
CREATE TABLE dropped_events (
    site   text NOT NULL,
    day    date NOT NULL,
    reason text NOT NULL,
    count  bigint NOT NULL,
    PRIMARY KEY (site, day, reason)
);
