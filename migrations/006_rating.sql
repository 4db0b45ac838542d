-- Rating: meters, aggregations, counters, plans, pricings, measurements and the
-- per-period aggregation state real-time drawdown keeps.

CREATE TABLE meters (
    id              bigserial PRIMARY KEY,
    code            text NOT NULL UNIQUE,
    name            text NOT NULL,
    product_id      bigint REFERENCES products (id),   -- NULL: global
    data_fields     jsonb NOT NULL,     -- [{code, category: measure|who|what|where}]
    derived_fields  jsonb NOT NULL,     -- [{code, expression}]
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE aggregations (
    id                  bigserial PRIMARY KEY,
    code                text NOT NULL UNIQUE,
    name                text NOT NULL,
    meter_id            bigint NOT NULL REFERENCES meters (id),
    target_field        text NOT NULL,
    function            text NOT NULL CHECK (function IN ('SUM', 'COUNT', 'MIN', 'MAX', 'MEAN', 'LATEST', 'UNIQUE')),
    quantity_per_unit   numeric NOT NULL CHECK (quantity_per_unit > 0),
    rounding            text NOT NULL CHECK (rounding IN ('up', 'down', 'nearest', 'none')),
    segment_field       text,
    created_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX aggregations_meter_idx ON aggregations (meter_id);

CREATE TABLE counters (
    id          bigserial PRIMARY KEY,
    code        text NOT NULL UNIQUE,
    name        text NOT NULL,
    unit        text NOT NULL,
    product_id  bigint REFERENCES products (id),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE counter_adjustments (
    id          bigserial PRIMARY KEY,
    account_id  bigint NOT NULL REFERENCES accounts (id),
    counter_id  bigint NOT NULL REFERENCES counters (id),
    effective   date NOT NULL,
    level       numeric NOT NULL CHECK (level >= 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, counter_id, effective)
);

CREATE TABLE plan_templates (
    id              bigserial PRIMARY KEY,
    code            text NOT NULL UNIQUE,
    name            text NOT NULL,
    product_id      bigint NOT NULL REFERENCES products (id),
    bill_frequency  text NOT NULL CHECK (bill_frequency IN ('daily', 'monthly', 'quarterly', 'annual')),
    bill_interval   integer NOT NULL CHECK (bill_interval BETWEEN 1 AND 366),
    currency_id     bigint NOT NULL REFERENCES credit_types (id),
    standing_charge numeric NOT NULL DEFAULT 0 CHECK (standing_charge >= 0),
    minimum_spend   numeric NOT NULL DEFAULT 0 CHECK (minimum_spend >= 0),
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE plans (
    id              bigserial PRIMARY KEY,
    code            text NOT NULL UNIQUE,
    name            text NOT NULL,
    template_id     bigint NOT NULL REFERENCES plan_templates (id),
    standing_charge numeric CHECK (standing_charge >= 0),    -- NULL: the template's
    minimum_spend   numeric CHECK (minimum_spend >= 0),
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE pricings (
    id              bigserial PRIMARY KEY,
    plan_id         bigint NOT NULL REFERENCES plans (id),
    aggregation_id  bigint REFERENCES aggregations (id),
    counter_id      bigint REFERENCES counters (id),
    start_date      date NOT NULL,
    end_date        date,               -- exclusive; NULL: open
    pricing_type    text NOT NULL CHECK (pricing_type IN ('per_unit', 'tiered', 'volume', 'stair_step')),
    bands           jsonb NOT NULL,     -- [{up_to, price}] ascending, the last open-ended
    fixed_fee       numeric NOT NULL DEFAULT 0 CHECK (fixed_fee >= 0),
    counter_mode    text NOT NULL DEFAULT 'prorate' CHECK (counter_mode IN ('prorate', 'peak')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((aggregation_id IS NULL) <> (counter_id IS NULL)),
    CHECK (end_date IS NULL OR end_date > start_date)
);
CREATE INDEX pricings_plan_idx ON pricings (plan_id);

CREATE TABLE account_plans (
    id          bigserial PRIMARY KEY,
    account_id  bigint NOT NULL REFERENCES accounts (id),
    plan_id     bigint NOT NULL REFERENCES plans (id),
    start_date  date NOT NULL,
    end_date    date,                   -- exclusive; NULL: open
    created_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (end_date IS NULL OR end_date > start_date)
);
CREATE INDEX account_plans_account_idx ON account_plans (account_id);

-- 1 unit of credit_type = rate units of fiat, from a date on (versioned by date)
CREATE TABLE conversion_rates (
    id              bigserial PRIMARY KEY,
    credit_type_id  bigint NOT NULL REFERENCES credit_types (id),
    fiat_id         bigint NOT NULL REFERENCES credit_types (id),
    effective       date NOT NULL,
    rate            numeric NOT NULL CHECK (rate > 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (credit_type_id, fiat_id, effective)
);

CREATE TABLE measurements (
    account_id  bigint NOT NULL,
    uid         text NOT NULL,
    meter_id    bigint NOT NULL,
    ts          timestamptz NOT NULL,
    data        jsonb NOT NULL,
    rated       boolean NOT NULL,       -- false: no active plan prices it (kept, reported)
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, uid)
);
CREATE INDEX measurements_unrated_idx ON measurements (account_id) WHERE NOT rated;

-- one row per (account, pricing, period, segment); counters keep no state here
CREATE TABLE aggregation_states (
    account_id      bigint NOT NULL,
    pricing_id      bigint NOT NULL,
    period_start    date NOT NULL,
    segment         text NOT NULL DEFAULT '',
    count           bigint NOT NULL DEFAULT 0,
    total           numeric NOT NULL DEFAULT 0,
    low             numeric,
    high            numeric,
    latest          numeric,
    latest_key      text NOT NULL DEFAULT '',
    uniques         bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (account_id, pricing_id, period_start, segment)
);

CREATE TABLE aggregation_uniques (
    account_id      bigint NOT NULL,
    pricing_id      bigint NOT NULL,
    period_start    date NOT NULL,
    segment         text NOT NULL,
    value           text NOT NULL,
    PRIMARY KEY (account_id, pricing_id, period_start, segment, value)
);

-- What real-time drawdown has charged for a pricing (or a plan's standing charge, pricing_id
-- NULL -> -account_plan_id) and period: the exact total in the balance credit type, and the
-- rounded total debited so far. Each debit is `drawn_after - drawn_before`, so the rounded
-- debits always add up to the rounded total (the remainder is carried, never lost).
CREATE TABLE rated_charges (
    account_id      bigint NOT NULL,
    charge_key      text NOT NULL,      -- "p<pricing id>" or "s<account plan id>"
    period_start    date NOT NULL,
    credit_type_id  bigint NOT NULL,
    exact           numeric NOT NULL DEFAULT 0,
    drawn_minor     bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (account_id, charge_key, period_start)
);

-- Each debit real-time drawdown owes; `uid` is the usage uid it is recorded under. A debit
-- whose uid is missing from usage_events after a crash is sent again by the worker.
CREATE TABLE rated_debits (
    account_id      bigint NOT NULL,
    uid             text NOT NULL,
    product_code    text NOT NULL,
    credit_type     text NOT NULL,
    amount          numeric NOT NULL CHECK (amount > 0),
    ts              timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, uid)
);
CREATE INDEX rated_debits_recent_idx ON rated_debits (created_at);
