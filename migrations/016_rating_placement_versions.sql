-- A pricing that arrives later rates what it covers, even measurements already rated by other
-- pricings (app/rating/rerate.py). Which pricings rated a measurement is known without a row per
-- (measurement, pricing): each measurement keeps the rating_config_version its rating read, in
-- the same statement as the pricings it used, and each pricing and account plan the version
-- its insert took. A pricing rated a measurement exactly when
-- greatest(pricing's, account plan's) <= the measurement's: the version row is updated under
-- its row lock by every writer, so a snapshot that reads version >= v sees every insert that
-- took v, and one that reads less sees none of them. A rating share-locks that row while it
-- reads the pricings, so it cannot commit a measurement stored at an older version after the
-- re-rating a new pricing requested has looked: rerate_requests are no longer kept for a grace
-- period (migration 012), they are dropped once a pass finds nothing more.
ALTER TABLE measurements ADD COLUMN config_version bigint NOT NULL DEFAULT 0;
ALTER TABLE pricings ADD COLUMN config_version bigint NOT NULL DEFAULT 0;
ALTER TABLE account_plans ADD COLUMN config_version bigint NOT NULL DEFAULT 0;

-- What the re-rating of unrated measurements had not reached yet when this migration ran is
-- older than every pricing and plan (version 0), so it is still found.
UPDATE measurements SET config_version = -1 WHERE NOT rated;

CREATE FUNCTION stamp_rating_config_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE rating_config_version SET version = version + 1 RETURNING version
        INTO NEW.config_version;
    RETURN NEW;
END $$;

CREATE TRIGGER pricings_stamp BEFORE INSERT ON pricings
    FOR EACH ROW EXECUTE FUNCTION stamp_rating_config_version();
CREATE TRIGGER account_plans_stamp BEFORE INSERT ON account_plans
    FOR EACH ROW EXECUTE FUNCTION stamp_rating_config_version();

-- Re-rating reads an account's measurements of its open billing periods (newest first); the
-- partial index of unrated ones served the old re-rating, which only looked at those.
CREATE INDEX measurements_account_ts_idx ON measurements (account_id, ts);
DROP INDEX measurements_unrated_idx;
