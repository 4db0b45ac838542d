-- Where an account plan's billing periods are counted from: its start date (anniversary
-- billing, as before) or the first day of the month, quarter or year its start falls in
-- (calendar billing: `billing: "calendar"` when it is attached). A first period that begins
-- before the plan does is prorated by day, as a last one cut short by its end
-- (app/rating/periods.py).
ALTER TABLE account_plans ADD COLUMN billing_anchor date;
UPDATE account_plans SET billing_anchor = start_date;
ALTER TABLE account_plans ALTER COLUMN billing_anchor SET NOT NULL;
