-- Recurring grants (app/ledger/recurring_grants.py): an allotment of credits granted to an
-- account every period (daily, monthly, quarterly or annual, every `interval`), each period's
-- credits a balance of their own that expires when the period ends; what expires unused rolls
-- over into the next period's balance, up to a percentage and a cap. The workers grant each
-- period once and roll each period over once (operation keys g:<balance> and o:<balance>).
CREATE TABLE recurring_grants (
    id                bigserial PRIMARY KEY,
    account_id        bigint NOT NULL REFERENCES accounts (id),
    credit_type_id    bigint NOT NULL REFERENCES credit_types (id),
    amount            numeric NOT NULL CHECK (amount > 0),
    frequency         text NOT NULL CHECK (frequency IN ('daily', 'monthly', 'quarterly', 'annual')),
    interval_count    int NOT NULL CHECK (interval_count BETWEEN 1 AND 366),
    start_date        date NOT NULL,
    end_date          date,               -- exclusive: no period starts on or after it
    product_codes     text[],
    priority          int NOT NULL,
    description       text NOT NULL DEFAULT '',
    rollover_percent  numeric NOT NULL DEFAULT 0 CHECK (rollover_percent BETWEEN 0 AND 100),
    rollover_max      numeric CHECK (rollover_max >= 0),  -- NULL: no cap beyond the percentage
    next_start        date NOT NULL,      -- the first period not granted yet (the workers' cursor)
    created_at        timestamptz NOT NULL DEFAULT now(),
    CHECK (end_date IS NULL OR end_date > start_date)
);
CREATE INDEX recurring_grants_account_idx ON recurring_grants (account_id, id);
CREATE INDEX recurring_grants_due_idx ON recurring_grants (next_start);

-- One row per granted period: the balance holding its credits (reserved before the grant, so
-- every process grants the same balance), and whether its expiry has been rolled over.
CREATE TABLE recurring_grant_periods (
    recurring_grant_id bigint NOT NULL REFERENCES recurring_grants (id),
    period_start       date NOT NULL,
    period_end         date NOT NULL,
    balance_id         bigint NOT NULL UNIQUE,
    rolled             boolean NOT NULL DEFAULT false,
    PRIMARY KEY (recurring_grant_id, period_start)
);
CREATE INDEX recurring_grant_periods_unrolled_idx ON recurring_grant_periods (period_end)
    WHERE NOT rolled;
