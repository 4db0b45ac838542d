-- Idempotency keys are remembered for a limited time (CREDITGATE_IDEMPOTENCY_KEY_TTL_H, 7 days
-- by default) and then deleted by the workers, oldest first, a batch at a time.
CREATE INDEX idempotency_keys_created_idx ON idempotency_keys (created_at);
