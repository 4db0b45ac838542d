-- Ledger rollups: an account's balance as of a past time (GET /v1/accounts/{code}/balance-at)
-- summed every ledger entry of the account up to that time, read through an index that does
-- not hold the time, so it took time in proportion to the account's whole history. The
-- entries are now summed per account, credit type and UTC hour of `created_at` by a worker
-- pass (app/ledger/rollups.py), as usage events are (migration 032), and a balance as of `at`
-- reads those sums for the hours before the hour of `at`, plus the entries of that hour, plus
-- the entries no pass has summed yet.
--
-- Which entries a pass has summed is told by transaction id (`ledger_entries.xid`, migration
-- 025): a pass sums the entries with `horizon_old <= xid < horizon_new`, where horizon_new is
-- the xmin of a snapshot, below which every transaction has ended. `xid` is an xid8, which
-- has no BRIN operator class in Postgres 15: the BRIN index is on its value as a bigint.
--
-- The entries of the hour of `at` are found through `ledger_account_idx (account_id,
-- credit_type_id, id)`, between two ids: a pass records the entry sequence's last value now
-- and then (`ledger_id_marks`), and an entry made at or after an instant T is written after it,
-- so its id is above the last value of a mark taken before T; an entry written in order (not
-- flushed late) has an id below a mark taken after its hour. The passes copy an entry written
-- later than that (a journal entry a dead process left) to `ledger_late`, indexed by time.
-- (With 10 minutes of slack for the clocks of app hosts: app/ledger/rollups.py.)
--
-- Entries written before migration 025 have no xid: they are summed here (every entry written
-- since has one, and the passes sum those, from horizon 0).
CREATE INDEX IF NOT EXISTS ledger_xid_brin ON ledger_entries USING brin ((xid::text::int8))
    WITH (pages_per_range = 32, autosummarize = on);

CREATE TABLE ledger_rollups (
    account_id      bigint NOT NULL,
    credit_type_id  bigint NOT NULL,
    hour            timestamptz NOT NULL,   -- the UTC hour of the entries' created_at
    entries         bigint NOT NULL,
    balance         numeric NOT NULL,       -- the sum of the entries other than overage
    overage         numeric NOT NULL,       -- what the overage entries owe (minus their sum)
    PRIMARY KEY (account_id, credit_type_id, hour)
);
CREATE TABLE ledger_rollup_cursor (
    id              smallint PRIMARY KEY CHECK (id = 1),
    horizon         bigint NOT NULL,        -- entries with xid < horizon (or none) are summed
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE ledger_late (
    id              bigint PRIMARY KEY,     -- the entry's
    account_id      bigint NOT NULL,
    credit_type_id  bigint NOT NULL,
    created_at      timestamptz NOT NULL,
    balance         numeric NOT NULL,       -- its amount, unless it is an overage entry
    overage         numeric NOT NULL        -- minus its amount, if it is one
);
CREATE INDEX ledger_late_account_idx ON ledger_late (account_id, created_at);
CREATE TABLE ledger_id_marks (
    taken_at        timestamptz PRIMARY KEY,    -- after the sequence was read
    last_id         bigint NOT NULL             -- every entry written later has a higher id
);
INSERT INTO ledger_rollups (account_id, credit_type_id, hour, entries, balance, overage)
    SELECT account_id, credit_type_id,
           date_trunc('hour', created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', count(*),
           COALESCE(sum(amount) FILTER (WHERE kind <> 'overage'), 0),
           COALESCE(-sum(amount) FILTER (WHERE kind = 'overage'), 0)
    FROM ledger_entries WHERE xid IS NULL
    GROUP BY 1, 2, 3;
INSERT INTO ledger_rollup_cursor (id, horizon) VALUES (1, 0);
