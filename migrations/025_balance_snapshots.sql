-- Balance snapshots: rebuilding a billing root's hot state (after FLUSHALL, a Redis restart,
-- an invalidation) summed every ledger entry of its balances and every overage entry of its
-- accounts, so it took time in proportion to the account's whole history (~0.5 s per 2
-- million entries here). A snapshot holds a balance's sum up to a horizon; a rebuild adds only
-- the entries after it (app/ledger/snapshots.py).
--
-- The horizon is a transaction id, not an entry id or a time: each entry records the id of
-- the transaction that wrote it (`xid`), and a snapshot taken in a transaction whose snapshot
-- has xmin X sums the entries with xid < X, every one of which is final (committed or never
-- to be). Entry ids and times would not do: a flush may commit after another that took later
-- ids, and a journal entry left by a dead process is flushed with its decision time.
--
-- Entries written before this migration have no xid: every balance and every account's
-- overage gets a snapshot of them here, horizon 0 (the snapshot holds the entries with no
-- xid; everything written from now on comes after it).
ALTER TABLE ledger_entries ADD COLUMN xid xid8;
ALTER TABLE ledger_entries ALTER COLUMN xid SET DEFAULT pg_current_xact_id();
CREATE INDEX ledger_balance_xid_idx ON ledger_entries (balance_id, xid);
DROP INDEX ledger_balance_idx;
CREATE INDEX ledger_overage_xid_idx ON ledger_entries (account_id, credit_type_id, xid)
    WHERE kind = 'overage';
CREATE INDEX ledger_grant_idx ON ledger_entries (balance_id) WHERE kind = 'grant';

CREATE TABLE balance_snapshots (
    balance_id      bigint PRIMARY KEY,
    horizon         xid8 NOT NULL,      -- holds the entries with xid < horizon, or no xid
    amount          numeric NOT NULL,
    tail_entries    bigint NOT NULL DEFAULT 0,  -- entries counted after it (approximate)
    taken_at        timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE overage_snapshots (
    account_id      bigint NOT NULL,
    credit_type_id  bigint NOT NULL,
    horizon         xid8 NOT NULL,
    amount          numeric NOT NULL,   -- the sum of the overage entries (<= 0: owed)
    tail_entries    bigint NOT NULL DEFAULT 0,
    taken_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, credit_type_id)
);
INSERT INTO balance_snapshots (balance_id, horizon, amount)
    SELECT b.id, '0', COALESCE(sum(e.amount), 0)
    FROM balances b LEFT JOIN ledger_entries e ON e.balance_id = b.id GROUP BY b.id;
INSERT INTO overage_snapshots (account_id, credit_type_id, horizon, amount)
    SELECT account_id, credit_type_id, '0', sum(amount) FROM ledger_entries
    WHERE kind = 'overage' GROUP BY account_id, credit_type_id;

-- How far the snapshot workers have counted new entries (by entry id: a count may miss an
-- entry that committed late, which only delays a snapshot; sums never go by id).
CREATE TABLE snapshot_cursor (
    id              smallint PRIMARY KEY CHECK (id = 1),
    last_entry      bigint NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
INSERT INTO snapshot_cursor (id, last_entry) SELECT 1, COALESCE(max(id), 0) FROM ledger_entries;
