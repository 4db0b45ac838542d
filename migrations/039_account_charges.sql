-- Charges (app/rating/charges.py): an amount in an account plan's currency put on the bill of
-- the period holding its day, e.g. the price of credits granted to an invoiced customer or a
-- set-up fee. Billed, not drawn from credits. The bill run takes a period's charges into its
-- bill under the account's lock (bill_id), and a charge for a billed period is refused, so
-- each charge is on one bill; one not billed yet may be voided.
CREATE TABLE account_charges (
    id              bigserial PRIMARY KEY,
    account_id      bigint NOT NULL REFERENCES accounts (id),
    account_plan_id bigint NOT NULL REFERENCES account_plans (id),
    day             date NOT NULL,
    amount          numeric NOT NULL CHECK (amount > 0),   -- in the plan's currency
    description     text NOT NULL,
    bill_id         bigint REFERENCES bills (id),
    voided_at       timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (bill_id IS NULL OR voided_at IS NULL)
);
CREATE INDEX account_charges_account_idx ON account_charges (account_id, id);
CREATE INDEX account_charges_plan_idx ON account_charges (account_plan_id, day);
CREATE INDEX account_charges_bill_idx ON account_charges (bill_id) WHERE bill_id IS NOT NULL;

ALTER TABLE bills ADD COLUMN charges_total numeric NOT NULL DEFAULT 0;
