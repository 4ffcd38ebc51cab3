-- Sites and their events. The per-site offset is allocated here, in PostgreSQL, under the
-- site row's lock, so offsets are gapless and commit-ordered (docs/ingest.md).

CREATE TABLE sites (
    id          text PRIMARY KEY
                CHECK (id ~ '^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$'
                       AND length(id) <= 253),
    -- Extra origins allowed to post from a browser (the id itself always is).
    domains     text[] NOT NULL DEFAULT '{}',
    -- Identity of this site's offset sequence; part of every cursor.
    epoch       text NOT NULL,
    -- The offset the next accepted event receives.
    next_offset bigint NOT NULL DEFAULT 1,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE events (
    site          text NOT NULL REFERENCES sites (id),
    site_offset   bigint NOT NULL,
    event_id      uuid NOT NULL,
    name          text NOT NULL,
    url           text NOT NULL,
    path          text NOT NULL,
    referrer      text,
    referrer_host text,
    props         jsonb NOT NULL DEFAULT '{}',
    visitor_id    bigint NOT NULL,
    device        text NOT NULL,
    ts            timestamptz NOT NULL,
    PRIMARY KEY (site, site_offset),
    -- Exactly-once storage: a retried event (same site + client event id) is stored once.
    UNIQUE (site, event_id)
);

-- History by time (GET /history?from=...) and retention.
CREATE INDEX events_site_ts ON events (site, ts);

-- Daily salts for cookieless visitor ids; rows older than 48 hours are deleted.
CREATE TABLE salts (
    day        date PRIMARY KEY,
    salt       bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
