-- One number that moves whenever what the recurring-charge sweep reads could change (account
-- plans, plans, plan templates, pricings): the workers sweep every account plan only when it
-- moved or the day changed, and otherwise retry only what they could not settle
-- (app/rating/recurring.py `sweep_when_due`). Every writing transaction updates the one row,
-- so its new value is visible only once that transaction committed, in commit order.
CREATE TABLE rating_config_version (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    version bigint NOT NULL
);
INSERT INTO rating_config_version (id, version) VALUES (true, 0);

CREATE FUNCTION bump_rating_config_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE rating_config_version SET version = version + 1;
    RETURN NULL;
END $$;

CREATE TRIGGER account_plans_version AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON account_plans FOR EACH STATEMENT EXECUTE FUNCTION bump_rating_config_version();
CREATE TRIGGER plans_version AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON plans FOR EACH STATEMENT EXECUTE FUNCTION bump_rating_config_version();
CREATE TRIGGER plan_templates_version AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON plan_templates FOR EACH STATEMENT EXECUTE FUNCTION bump_rating_config_version();
CREATE TRIGGER pricings_version AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON pricings FOR EACH STATEMENT EXECUTE FUNCTION bump_rating_config_version();
