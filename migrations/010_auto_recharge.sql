-- Threshold auto-recharge: per account and credit type, "when my balance falls to X, recharge
-- me back to Y". A crossing detected by the hot path inserts one `auto_recharges` row in the
-- transaction that commits the debit; at most one per account and credit type is in flight.

CREATE TABLE auto_recharge_configs (
    account_id          bigint NOT NULL REFERENCES accounts (id),
    credit_type_id      bigint NOT NULL REFERENCES credit_types (id),
    enabled             boolean NOT NULL DEFAULT true,
    threshold           numeric NOT NULL CHECK (threshold >= 0),
    recharge_to         numeric NOT NULL,
    price_per_credit    numeric NOT NULL CHECK (price_per_credit > 0),
    currency            text NOT NULL,
    expires_in_days     integer CHECK (expires_in_days > 0),   -- NULL: the credits never expire
    product_codes       text[],                                -- NULL: every product
    payment_method_id   text,                                  -- NULL: the customer's default
    max_per_day         integer NOT NULL DEFAULT 10 CHECK (max_per_day > 0),
    min_charge          numeric NOT NULL DEFAULT 0 CHECK (min_charge >= 0),   -- in `currency`
    disabled_reason     text,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, credit_type_id),
    CHECK (threshold < recharge_to)
);

CREATE TABLE auto_recharges (
    id              bigserial PRIMARY KEY,
    account_id      bigint NOT NULL REFERENCES accounts (id),
    credit_type_id  bigint NOT NULL REFERENCES credit_types (id),
    -- what started it: the crossing's operation ("x:<op key>"), or a re-enable / sweep
    trigger_key     text NOT NULL UNIQUE,
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'processing', 'succeeded', 'failed')),
    available       numeric NOT NULL,       -- the drawable balance when it was created
    credits         numeric NOT NULL,       -- recharge_to - available
    purchase_id     bigint,
    reason          text,                   -- why it failed
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX auto_recharges_one_in_flight ON auto_recharges (account_id, credit_type_id)
    WHERE status IN ('pending', 'processing');
CREATE INDEX auto_recharges_pending_idx ON auto_recharges (created_at) WHERE status = 'pending';
