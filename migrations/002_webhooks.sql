-- Outbound webhooks: endpoints, the outbox of events, one delivery per (event, endpoint),
-- and a log row per attempt. Balance thresholds that raise `balance.low`.

CREATE TABLE webhook_endpoints (
    id                          bigserial PRIMARY KEY,
    url                         text NOT NULL,
    description                 text NOT NULL DEFAULT '',
    event_types                 text[],             -- NULL: every type
    enabled                     boolean NOT NULL DEFAULT true,
    disabled_reason             text,
    secret                      text NOT NULL,      -- whsec_<base64>
    previous_secret             text,               -- still signs until previous_secret_expires_at
    previous_secret_expires_at  timestamptz,
    failing_since               timestamptz,        -- first failure of the current failing streak
    created_at                  timestamptz NOT NULL DEFAULT now(),
    updated_at                  timestamptz NOT NULL DEFAULT now()
);

-- The outbox: written in the same transaction as the change that caused the event.
CREATE TABLE webhook_events (
    id          text PRIMARY KEY,                   -- evt_...: derived from the causing operation
    type        text NOT NULL,
    account_id  bigint REFERENCES accounts (id),
    sequence    bigint,                             -- per billing root, in decision order
    payload     jsonb NOT NULL,                     -- {type, timestamp, data}
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_events_created_idx ON webhook_events (created_at);
CREATE INDEX webhook_events_type_idx ON webhook_events (type, created_at);

CREATE TABLE webhook_deliveries (
    id              bigserial PRIMARY KEY,
    event_id        text NOT NULL REFERENCES webhook_events (id),
    endpoint_id     bigint NOT NULL REFERENCES webhook_endpoints (id),
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'delivered', 'failed', 'cancelled')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_status     integer,
    last_error      text,
    delivered_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (event_id, endpoint_id)
);
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_endpoint_idx ON webhook_deliveries (endpoint_id, id);

CREATE TABLE webhook_attempts (
    id                bigserial PRIMARY KEY,
    delivery_id       bigint NOT NULL REFERENCES webhook_deliveries (id),
    attempted_at      timestamptz NOT NULL DEFAULT now(),
    status_code       integer,                      -- NULL: no HTTP answer (timeout, refused)
    latency_ms        integer NOT NULL,
    error             text,
    response_excerpt  text
);
CREATE INDEX webhook_attempts_delivery_idx ON webhook_attempts (delivery_id, id);

-- `balance.low` fires once when an account's drawable balance of a credit type goes below
-- the threshold, and re-arms when it is back at or above it.
CREATE TABLE balance_thresholds (
    account_id      bigint NOT NULL REFERENCES accounts (id),
    credit_type_id  bigint NOT NULL REFERENCES credit_types (id),
    low             numeric NOT NULL CHECK (low > 0),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, credit_type_id)
);
