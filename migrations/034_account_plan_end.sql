-- An account plan's end can be set later (POST /v1/accounts/{code}/plans/{id}/end): a plan
-- change ends one plan where the next begins. A plan that has not started may be ended on its
-- start date: an empty range, the plan cancelled before it applied (every date test in the
-- rating, the recurring charges and the bill run, `start_date <= d < end_date`, finds none).
ALTER TABLE account_plans DROP CONSTRAINT account_plans_check,
    ADD CONSTRAINT account_plans_range CHECK (end_date IS NULL OR end_date >= start_date);
