-- credits.expiring: the workers announce each balance once, some days before it expires, with
-- what remains of it (app/ledger/expiry_notices.py). `expiry_noticed_at` says it was done; the
-- partial index holds only the balances still to announce.
ALTER TABLE balances ADD COLUMN expiry_noticed_at timestamptz;
CREATE INDEX balances_expiry_notice_idx ON balances (expires_at)
    WHERE status = 'active' AND expires_at IS NOT NULL AND expiry_noticed_at IS NULL;
