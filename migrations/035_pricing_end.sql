-- A pricing's end can be set later (POST /v1/pricings/{id}/end): a price change ends one
-- pricing where the next begins. One that has not started may be ended on its start date: an
-- empty range, never applied (as an account plan's, migration 034; the queries that test a
-- pricing's range against a billing period leave empty ones out).
ALTER TABLE pricings DROP CONSTRAINT pricings_check1,
    ADD CONSTRAINT pricings_range CHECK (end_date IS NULL OR end_date >= start_date);
