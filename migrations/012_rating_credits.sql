-- Rating give-backs (a charge that goes down is credited back mid-period) and the re-rating
-- of measurements stored unrated once a plan or pricing covers them.

-- Which running charge a rated debit belongs to, so a give-back can reverse the period's own
-- debits. NULL on debits written before this migration: those are never reversed (what a
-- give-back cannot reverse is credited in the account's favour instead).
ALTER TABLE rated_debits ADD COLUMN charge_key text, ADD COLUMN period_start date;
CREATE INDEX rated_debits_charge_idx ON rated_debits (account_id, charge_key, period_start)
    WHERE charge_key IS NOT NULL;

-- Each give-back real-time drawdown owes: `round(running after) < drawn` for a charge. Written
-- in the rating transaction (atomic with the state it comes from); `uid` is
-- `c<pricing id>:<measurement uid>`. Settled once its parts (below) add up to `amount` and
-- every part is in the ledger; an unsettled one is finished by the worker.
CREATE TABLE rated_credits (
    account_id      bigint NOT NULL,
    uid             text NOT NULL,
    charge_key      text NOT NULL,
    period_start    date NOT NULL,
    product_code    text NOT NULL,
    credit_type     text NOT NULL,
    amount          numeric NOT NULL CHECK (amount > 0),
    ts              timestamptz NOT NULL,
    settled_at      timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, uid)
);
CREATE INDEX rated_credits_unsettled_idx ON rated_credits (created_at) WHERE settled_at IS NULL;
CREATE INDEX rated_credits_charge_idx ON rated_credits (account_id, charge_key, period_start);

-- How a give-back is paid: which part of which earlier debit of the same charge it reverses
-- (planned under a per-charge lock, newest debit first, its overage before its balances).
-- source: overage (an `overage` entry with a positive amount), balance (an `adjustment` on the
-- balance the debit drew; `fallback_balance_id` is the balance granted instead when that one
-- is no longer live), favour (nothing left to reverse: a new balance in the account's favour,
-- id `fallback_balance_id`). Ledger op key of a part: `rc:<account id>:<credit uid>:<seq>`.
CREATE TABLE rated_credit_parts (
    account_id          bigint NOT NULL,
    credit_uid          text NOT NULL,
    seq                 integer NOT NULL,
    source              text NOT NULL CHECK (source IN ('overage', 'balance', 'favour')),
    debit_uid           text,
    owner_id            bigint,         -- the account owning balance_id (maybe a parent)
    balance_id          bigint,
    amount              numeric NOT NULL CHECK (amount > 0),
    fallback_balance_id bigint,
    lease_until         timestamptz,    -- being applied by someone until then
    applied_at          timestamptz,    -- in the ledger
    PRIMARY KEY (account_id, credit_uid, seq),
    CHECK ((source = 'balance') = (balance_id IS NOT NULL))
);
CREATE INDEX rated_credit_parts_debit_idx ON rated_credit_parts (account_id, debit_uid);

-- Accounts whose unrated measurements may have become ratable: written in the transaction that
-- attaches a plan or adds a pricing, worked off by the worker (and kept for a grace period, so
-- a measurement whose rating transaction raced the plan's commit is still found).
CREATE TABLE rerate_requests (
    account_id      bigint PRIMARY KEY,
    requested_at    timestamptz NOT NULL DEFAULT now()
);
