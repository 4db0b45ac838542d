-- Auto-recharge that also pays what the account owes (README: Auto-recharge). The config says
-- whether it should; each recharge fixes, before its charge is first made, the debt it adds to
-- the credits it buys (NULL: not fixed yet, or the config does not pay overage), so a retry
-- under the same Stripe idempotency key asks for the same amount.
ALTER TABLE auto_recharge_configs ADD COLUMN IF NOT EXISTS pays_overage boolean NOT NULL DEFAULT false;
ALTER TABLE auto_recharges ADD COLUMN IF NOT EXISTS owed numeric;
