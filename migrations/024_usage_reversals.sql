-- Reversals of usage events (app/entitlements/reversals.py): a debit reported by mistake (a
-- retried request counted twice, a use that failed after its usage was sent) given back, in
-- full or in part, once per event. The row is written first (the reversal's amount is then
-- fixed), the give-backs are keyed ledger operations `ur:<account>:<uid>:<seq>`, and the row
-- becomes `reversed` once they are in the ledger; the workers finish one a crash left
-- `reversing`.
CREATE TABLE usage_reversals (
    account_id      bigint NOT NULL REFERENCES accounts (id),
    uid             text NOT NULL,
    amount          numeric NOT NULL CHECK (amount > 0),
    reason          text NOT NULL DEFAULT '',
    status          text NOT NULL CHECK (status IN ('reversing', 'reversed')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, uid)
);
CREATE INDEX usage_reversals_open_idx ON usage_reversals (updated_at) WHERE status = 'reversing';
