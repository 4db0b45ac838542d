-- Holds (app/entitlements/holds.py): credit set aside for a use whose cost is known only
-- after it (an LLM call, a job), then captured (what it cost) or released. The hold itself is
-- a check-and-consume under the usage uid `h0:<uid>` (ledger kind `hold`, one entry per
-- balance drawn); what is not captured goes back to those balances as `release` entries.
-- The journal flush writes this row with the hold's entries (one transaction), so a hold
-- exists exactly when its debit does. It is the hold's state machine: held -> capturing ->
-- captured, held -> releasing -> released | expired. A refused hold writes nothing.
CREATE TABLE holds (
    account_id      bigint NOT NULL REFERENCES accounts (id),
    uid             text NOT NULL,
    product_code    text NOT NULL,
    credit_type_id  bigint NOT NULL REFERENCES credit_types (id),
    amount          numeric NOT NULL CHECK (amount > 0),
    captured        numeric CHECK (captured >= 0 AND captured <= amount),
    status          text NOT NULL CHECK (status IN ('held', 'capturing', 'captured',
                                                    'releasing', 'released', 'expired')),
    final_status    text,               -- what a capturing/releasing hold becomes
    expires_at      timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, uid)
);
-- the workers' work: held ones past their expiry, and any a crash left half-ended
CREATE INDEX holds_open_idx ON holds (expires_at)
    WHERE status IN ('held', 'capturing', 'releasing');
