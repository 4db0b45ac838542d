-- Usage rollups: the usage summary (GET /v1/accounts/{code}/usage-summary) read every event of
-- its range, ~4 us each, so a month of a busy account took seconds. The client's usage events
-- are now summed per account, UTC hour of their timestamp, product and credit type by a worker
-- pass (app/entitlements/rollups.py), and a summary over whole hours reads those sums plus the
-- events written since the last pass.
--
-- Which events a pass has summed is told by transaction id, as for balance snapshots
-- (migration 025), not by time: a journal entry left by a dead process is flushed late with
-- its decision time. Each event records the id of the transaction that wrote it (`xid`, as a
-- bigint so that a BRIN index can hold it: xid8 has no BRIN operator class in Postgres 15);
-- a pass sums the events with `horizon_old <= xid < horizon_new`, where horizon_new is the
-- xmin of a snapshot, below which every transaction has ended, so every event is summed once.
--
-- Events written before this migration have no xid: they are summed here (the ALTER below
-- holds the table's lock to the end of this transaction, so none is written meanwhile).
ALTER TABLE usage_events ADD COLUMN IF NOT EXISTS xid bigint;
ALTER TABLE usage_events ALTER COLUMN xid SET DEFAULT (pg_current_xact_id()::text::bigint);
-- BRIN: xids grow with the table, so the index is a few pages and costs nothing per insert.
-- Pages not yet summarized are read by every range query; autosummarize has autovacuum
-- summarize each range once it fills (within a minute), not at the table's next vacuum (after
-- 20% more rows, on an insert-only table).
CREATE INDEX IF NOT EXISTS usage_events_xid_brin ON usage_events USING brin (xid)
    WITH (pages_per_range = 32, autosummarize = on);
-- the holds' set-asides, which a summary reads live (what a hold captured changes later)
CREATE INDEX IF NOT EXISTS usage_events_hold_time_idx ON usage_events (account_id, event_time)
    WHERE uid LIKE 'h0:%';

CREATE TABLE usage_rollups (
    account_id      bigint NOT NULL,
    hour            timestamptz NOT NULL,   -- the UTC hour of the events' timestamps
    product_code    text NOT NULL,
    credit_type_id  bigint NOT NULL,
    events          bigint NOT NULL,
    amount          numeric NOT NULL,
    overage         numeric NOT NULL,
    PRIMARY KEY (account_id, hour, product_code, credit_type_id)
);
CREATE TABLE usage_rollup_cursor (
    id              smallint PRIMARY KEY CHECK (id = 1),
    horizon         bigint NOT NULL,        -- events with xid < horizon (or none) are summed
    updated_at      timestamptz NOT NULL DEFAULT now()
);
INSERT INTO usage_rollups (account_id, hour, product_code, credit_type_id, events, amount, overage)
    SELECT account_id, date_trunc('hour', event_time AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
           product_code, credit_type_id, count(*), sum(amount), sum(overage)
    FROM usage_events WHERE xid IS NULL AND uid !~ '^[rscbh][0-9]+:'
    GROUP BY 1, 2, 3, 4;
INSERT INTO usage_rollup_cursor (id, horizon) VALUES (1, 0);
