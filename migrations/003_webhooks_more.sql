-- Outbound webhooks, second step.
-- `attempts` counts every claim of a delivery and never goes down (it is the claim token a
-- dispatcher checks when it records the outcome); a replay sets `retry_base` to it, so the
-- retry schedule starts over at `attempts - retry_base`.
ALTER TABLE webhook_deliveries ADD COLUMN retry_base integer NOT NULL DEFAULT 0;
ALTER TABLE webhook_attempts ADD COLUMN attempt integer;

-- the delivery log, newest first, by status; replays of failed deliveries
CREATE INDEX webhook_deliveries_status_idx ON webhook_deliveries (status, id);
