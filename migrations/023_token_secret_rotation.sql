-- Rotation of the customer-token signing secret (app/auth/tokens.py, `creditgate tokens
-- rotate-secret`). Several secrets may exist; ids only grow (a rotation writes max(id) + 1
-- under a table lock), and the newest secret not retired signs new tokens. A token names the
-- id of the secret that signed it; tokens minted before this migration name none and stand
-- for secret 1. A secret verifies until `retired_at` (NULL: not retired): a plain rotation
-- sets it on the older secrets to the moment every token they signed has expired, a rotation
-- after a leak (`--retire-now`) to now. The row that exists keeps id 1 and stays valid.
ALTER TABLE token_secrets DROP CONSTRAINT token_secrets_id_check;
ALTER TABLE token_secrets ADD CONSTRAINT token_secrets_id_check CHECK (id >= 1);
ALTER TABLE token_secrets ADD COLUMN retired_at timestamptz;
