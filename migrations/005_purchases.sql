-- Credit purchases through Stripe: the account's Stripe customer, one row per purchase, and
-- every inbound Stripe event stored once by its id.

CREATE TABLE stripe_customers (
    account_id      bigint PRIMARY KEY REFERENCES accounts (id),
    customer_id     text NOT NULL UNIQUE,           -- cus_...
    created_here    boolean NOT NULL,               -- created by creditgate, or attached by id
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE purchases (
    id                  bigserial PRIMARY KEY,
    account_id          bigint NOT NULL REFERENCES accounts (id),
    balance_id          bigint NOT NULL UNIQUE REFERENCES balances (id),
    credit_type_id      bigint NOT NULL REFERENCES credit_types (id),
    credits             numeric NOT NULL CHECK (credits > 0),
    price               numeric NOT NULL CHECK (price > 0),
    currency            text NOT NULL,                  -- lowercase ISO 4217, as Stripe wants it
    amount_minor        bigint NOT NULL CHECK (amount_minor > 0),   -- what Stripe charges
    method              text NOT NULL CHECK (method IN ('saved_card', 'checkout')),
    -- granting: Stripe said paid and the grant is under way (a crash here is finished by the
    -- reconciler); only a pending purchase can fail, only a granting one becomes paid.
    status              text NOT NULL DEFAULT 'pending'
                        CHECK (status IN ('pending', 'granting', 'paid', 'failed', 'refunded')),
    stripe_customer_id  text NOT NULL,
    payment_method_id   text,                           -- saved_card: the default at purchase time
    success_url         text,                           -- checkout
    cancel_url          text,
    payment_intent_id   text UNIQUE,
    checkout_session_id text UNIQUE,
    checkout_url        text,
    stripe_status       text,                           -- last PaymentIntent / Session status seen
    next_action         text,                           -- what the customer must do (requires_action)
    failure_code        text,
    decline_code        text,
    failure_message     text,
    amount_refunded     bigint NOT NULL DEFAULT 0,      -- minor units
    description         text NOT NULL DEFAULT '',
    -- the API request that created it: a retry after a crash continues this purchase
    api_key_id          bigint REFERENCES api_keys (id),
    request_key         text,
    -- reconciler: when to look at this purchase again, and how often it has
    check_after         timestamptz NOT NULL DEFAULT now(),
    checks              integer NOT NULL DEFAULT 0,
    last_error          text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    paid_at             timestamptz,
    UNIQUE (api_key_id, request_key)
);
CREATE INDEX purchases_account_idx ON purchases (account_id, id);
CREATE INDEX purchases_unsettled_idx ON purchases (check_after) WHERE status IN ('pending', 'granting');

CREATE TABLE stripe_events (
    id              text PRIMARY KEY,                   -- evt_...
    type            text NOT NULL,
    payload         jsonb NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now(),
    handled_at      timestamptz,
    outcome         text,
    attempts        integer NOT NULL DEFAULT 0,
    retry_after     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stripe_events_unhandled_idx ON stripe_events (retry_after) WHERE handled_at IS NULL;
