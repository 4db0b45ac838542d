-- What a running charge has given back in real time (minor units). Moving an account plan's
-- end earlier gives the cut-off days' standing charge (and prorated counters) back at once,
-- and moving it later again draws them again, so a charge's drawn total can fall and rise
-- before its bill: each debit's uid counts what was debited in all (drawn + given), which only
-- grows, and each give-back's counts what was given (app/rating/recurring.py), so no uid is
-- ever used twice.
ALTER TABLE rated_charges ADD COLUMN given_minor bigint NOT NULL DEFAULT 0;
