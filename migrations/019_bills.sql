-- The bill run: one final bill per account plan and closed billing period (app/rating/bills.py).
-- A bill is written once and never changed; a measurement for a billed period is stored
-- unrated (the pricing query skips billed periods), so nothing is drawn that the bill lacks.
CREATE TABLE bills (
    id              bigserial PRIMARY KEY,
    account_id      bigint NOT NULL REFERENCES accounts (id),
    account_plan_id bigint NOT NULL REFERENCES account_plans (id),
    period_start    date NOT NULL,
    period_end      date NOT NULL,
    currency_id     bigint NOT NULL REFERENCES credit_types (id),
    standing_charge numeric NOT NULL,   -- amounts in the plan's currency, exact
    pricings        jsonb NOT NULL,     -- each pricing's quantity, bands and amount
    subtotal        numeric NOT NULL,   -- standing charge + pricings
    minimum_spend   numeric NOT NULL,   -- the plan's
    minimum_topup   numeric NOT NULL,   -- what makes the subtotal up to the minimum spend
    total           numeric NOT NULL,   -- subtotal + top-up, rounded half up at the currency's places
    credit_type_id  bigint REFERENCES credit_types (id),  -- the account's; NULL: none to draw
    drawn           numeric,            -- credits the period's charges drew, settlement included
    settled         numeric,            -- what the bill run itself drew (+) or gave back (-)
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- by period end: the pricing query's `period_end > day` reads from a measurement's day
    -- on, where a current measurement finds no bill at all
    UNIQUE (account_plan_id, period_end),
    CHECK (period_end > period_start)
);
CREATE INDEX bills_account_idx ON bills (account_id, id);

