-- Core: keys, configuration, balances, the append-only ledger, usage events, idempotency.

CREATE TABLE api_keys (
    id          bigserial PRIMARY KEY,
    key_hash    bytea NOT NULL UNIQUE,
    prefix      text NOT NULL,
    scope       text NOT NULL CHECK (scope IN ('admin', 'runtime')),
    name        text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE TABLE credit_types (
    id              bigserial PRIMARY KEY,
    code            text NOT NULL UNIQUE,
    name            text NOT NULL,
    kind            text NOT NULL CHECK (kind IN ('fiat', 'custom')),
    decimal_places  smallint NOT NULL CHECK (decimal_places BETWEEN 0 AND 9),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE products (
    id          bigserial PRIMARY KEY,
    code        text NOT NULL UNIQUE,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE accounts (
    id              bigint PRIMARY KEY,
    code            text NOT NULL UNIQUE,
    name            text NOT NULL,
    email           text,
    parent_id       bigint REFERENCES accounts (id),
    -- the billing root: the account itself, or its parent's root. Its id is the Redis hash tag.
    root_id         bigint NOT NULL REFERENCES accounts (id),
    status          text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'blocked')),
    credit_type_id  bigint REFERENCES credit_types (id),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE SEQUENCE accounts_id_seq OWNED BY accounts.id;
CREATE INDEX accounts_root_idx ON accounts (root_id);

CREATE TABLE balances (
    id              bigint PRIMARY KEY,
    account_id      bigint NOT NULL REFERENCES accounts (id),
    credit_type_id  bigint NOT NULL REFERENCES credit_types (id),
    product_codes   text[],                 -- NULL: every product
    priority        integer NOT NULL,
    effective_at    timestamptz NOT NULL,
    expires_at      timestamptz,
    description     text NOT NULL DEFAULT '',
    source          text NOT NULL,
    status          text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'pending', 'voided', 'expired')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (expires_at IS NULL OR expires_at > effective_at)
);
CREATE SEQUENCE balances_id_seq OWNED BY balances.id;
CREATE INDEX balances_account_idx ON balances (account_id);
CREATE INDEX balances_expiry_idx ON balances (expires_at) WHERE status = 'active' AND expires_at IS NOT NULL;

-- Every change to a balance is one row here; a balance is the sum of its rows.
CREATE TABLE ledger_entries (
    id              bigserial PRIMARY KEY,
    op_key          text NOT NULL,          -- the operation that wrote it (idempotency)
    seq             smallint NOT NULL,      -- position within that operation
    account_id      bigint NOT NULL REFERENCES accounts (id),
    balance_id      bigint REFERENCES balances (id),   -- NULL for overage
    credit_type_id  bigint NOT NULL REFERENCES credit_types (id),
    kind            text NOT NULL CHECK (kind IN ('grant', 'debit', 'void', 'expire', 'rollover',
                                                  'adjustment', 'hold', 'release', 'overage')),
    amount          numeric NOT NULL,
    usage_uid       text,
    product_code    text,
    description     text NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL,
    journal_id      text,                   -- "<root>:<stream id>" of the journal entry it came from
    UNIQUE (op_key, seq),
    CHECK ((kind = 'overage') = (balance_id IS NULL))
);
CREATE INDEX ledger_account_idx ON ledger_entries (account_id, credit_type_id, id);
CREATE INDEX ledger_balance_idx ON ledger_entries (balance_id);

CREATE FUNCTION ledger_entries_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger entries are append-only';
END $$;
CREATE TRIGGER ledger_entries_no_update_or_delete
    BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_entries_append_only();

CREATE TABLE usage_events (
    account_id      bigint NOT NULL REFERENCES accounts (id),
    uid             text NOT NULL,
    product_code    text NOT NULL,
    credit_type_id  bigint NOT NULL REFERENCES credit_types (id),
    amount          numeric NOT NULL CHECK (amount > 0),
    overage         numeric NOT NULL DEFAULT 0,
    event_time      timestamptz NOT NULL,
    recorded_at     timestamptz NOT NULL,
    PRIMARY KEY (account_id, uid)
);

CREATE TABLE idempotency_keys (
    api_key_id      bigint NOT NULL REFERENCES api_keys (id),
    key             text NOT NULL,
    request_hash    bytea NOT NULL,
    status_code     integer,
    response_body   bytea,
    locked_at       timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (api_key_id, key)
);
