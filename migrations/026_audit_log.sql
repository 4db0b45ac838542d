-- The audit trail of DESIGN's admin caller: every authenticated, well-formed write to the
-- configuration surface (the routes an admin key may write; a usage reversal by either key),
-- with who made it, what it sent and how it ended (app/audit.py). The row is written before
-- the change runs and completed after it, so a change is never made without its row; a
-- process that dies in between leaves `status` null (outcome unknown). Kept forever.
CREATE TABLE audit_log (
    id              bigserial PRIMARY KEY,
    at              timestamptz NOT NULL DEFAULT now(),
    api_key_id      bigint NOT NULL REFERENCES api_keys (id),
    method          text NOT NULL,
    path            text NOT NULL,
    idempotency_key text,
    body            text NOT NULL,          -- as sent, up to 16 KiB
    status          integer,                -- the answer's HTTP status; null: never finished
    finished_at     timestamptz
);
CREATE INDEX audit_log_key_idx ON audit_log (api_key_id, id);
