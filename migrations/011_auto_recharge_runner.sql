-- The recharge runner: a recharge is retried (and a dead runner's claim taken over) once its
-- retry_after passes; its purchase is linked by recharge_id, which also names the Stripe
-- idempotency key (one key per recharge, whichever process sends it).

ALTER TABLE auto_recharges
    ADD COLUMN attempts     integer NOT NULL DEFAULT 0,
    ADD COLUMN retry_after  timestamptz NOT NULL DEFAULT now();
CREATE INDEX auto_recharges_due_idx ON auto_recharges (retry_after)
    WHERE status IN ('pending', 'processing');
CREATE INDEX auto_recharges_config_idx ON auto_recharges (account_id, credit_type_id, created_at);

ALTER TABLE purchases ADD COLUMN recharge_id bigint UNIQUE REFERENCES auto_recharges (id);
