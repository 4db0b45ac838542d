-- Customer tokens (app/auth/tokens.py): short-lived, signed, read-only access to one account
-- for the end customer's browser. Tokens are not stored; they are verified against this one
-- signing secret, shared by every app instance. The first instance that needs it writes it
-- (32 random bytes from the app, INSERT ... ON CONFLICT DO NOTHING), every other one reads it.
CREATE TABLE token_secrets (
    id          smallint PRIMARY KEY CHECK (id = 1),
    secret      bytea NOT NULL CHECK (length(secret) = 32),
    created_at  timestamptz NOT NULL DEFAULT now()
);
