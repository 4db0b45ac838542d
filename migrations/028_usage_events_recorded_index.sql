-- An account's usage events by the time they were recorded (app/entitlements/history.py).
-- Three readers: the usage-event list (newest first), the usage summary (an event's timestamp
-- lies within the accepted window of when it was recorded, so a range of timestamps is a
-- bounded range of this index), and the restore of the uid marks after Redis lost a root
-- (events of the last two days): before, that read every event the account ever had.
-- Costs ~2 µs of Postgres per event written (bench/README.md). On a large existing table,
-- build it by hand first with CREATE INDEX CONCURRENTLY under the same name: this file then
-- skips it instead of blocking writes for the build.
CREATE INDEX IF NOT EXISTS usage_events_recorded_idx ON usage_events (account_id, recorded_at);
