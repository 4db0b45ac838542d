-- Credits a plan includes every billing period ("10,000 API credits a month"): attaching the
-- plan to an account makes one recurring grant per allotment (app/ledger/recurring_grants.py),
-- tied to the account plan: its periods are the account plan's billing periods, a period the
-- account plan covers in part gets its credits prorated by day and expiring when the cover
-- ends, and moving the account plan's end moves the grant's.
CREATE TABLE plan_credits (
    id                bigserial PRIMARY KEY,
    plan_id           bigint NOT NULL REFERENCES plans (id),
    credit_type_id    bigint NOT NULL REFERENCES credit_types (id),
    amount            numeric NOT NULL CHECK (amount > 0),
    product_codes     text[],
    priority          int NOT NULL,
    description       text NOT NULL DEFAULT '',
    rollover_percent  numeric NOT NULL DEFAULT 0 CHECK (rollover_percent BETWEEN 0 AND 100),
    rollover_max      numeric CHECK (rollover_max >= 0)
);
CREATE INDEX plan_credits_plan_idx ON plan_credits (plan_id, id);

ALTER TABLE recurring_grants
    ADD COLUMN account_plan_id bigint REFERENCES account_plans (id),
    ADD COLUMN plan_credit_id bigint REFERENCES plan_credits (id),
    -- where the periods are counted from (the account plan's billing anchor); NULL: start_date
    ADD COLUMN anchor_date date,
    ADD CONSTRAINT recurring_grants_plan_credit_key UNIQUE (account_plan_id, plan_credit_id);
-- an account plan ended on its start date (it never applies) ends its grants there too
ALTER TABLE recurring_grants DROP CONSTRAINT recurring_grants_check,
    ADD CONSTRAINT recurring_grants_check CHECK (end_date IS NULL OR end_date >= start_date);
