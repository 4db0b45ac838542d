-- When a bill's `bill.settled` event was written (app/rating/bills.py: announce_settled): once
-- every debit and give-back of its charges is in the ledger, so its covered/overage split is
-- final. Bills written before this migration count as announced (no event for them).
ALTER TABLE bills ADD COLUMN settled_at timestamptz;
UPDATE bills SET settled_at = created_at;
CREATE INDEX bills_unsettled_idx ON bills (id) WHERE settled_at IS NULL;
