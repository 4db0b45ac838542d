-- The two tables every usage event writes to lose their foreign keys: each key check takes a
-- KEY SHARE lock on the parent row and was most of the insert cost (measured: bench/README).
-- Only the journal flusher writes these tables, from ids it has just validated, and nothing is
-- ever deleted from accounts, balances or credit types, so the keys guarded nothing real.
ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_account_id_fkey;
ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_balance_id_fkey;
ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_credit_type_id_fkey;
ALTER TABLE usage_events DROP CONSTRAINT usage_events_account_id_fkey;
ALTER TABLE usage_events DROP CONSTRAINT usage_events_credit_type_id_fkey;
