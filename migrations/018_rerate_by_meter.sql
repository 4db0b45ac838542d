-- A re-rating request reads only the meters its new pricings rate (app/rating/rerate.py).
-- Before, every request read each of the account's measurements of its open periods (through
-- (account_id, ts)) and tested each one against every pricing: adding a pricing for one meter
-- to a plan on 10,000 accounts read every measurement of every meter of all of them.
-- `from_version` is the rating_config_version of the pricing or account plan that asked (the
-- lowest, when requests for an account merge): pricings visible from it on are the new ones,
-- and their meters are the ones to read. NULL (requests from before this migration): every
-- meter, as before.
ALTER TABLE rerate_requests ADD COLUMN from_version bigint;
CREATE INDEX measurements_account_meter_ts_idx ON measurements (account_id, meter_id, ts);
DROP INDEX measurements_account_ts_idx;
