-- A purchase may pay what its account owes first: once paid, its credits go to the account's
-- overage in their credit type before anything else (ledger op po:<purchase>: an adjustment
-- on the purchased balance and an overage entry with a positive amount).
ALTER TABLE purchases ADD COLUMN pays_overage boolean NOT NULL DEFAULT false;
