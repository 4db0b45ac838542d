-- Looking accounts up (GET /v1/accounts?email=&parent=): by email, compared without case, and
-- a parent's children. Both were a scan of every account.
CREATE INDEX IF NOT EXISTS accounts_email_idx ON accounts (lower(email));
CREATE INDEX IF NOT EXISTS accounts_parent_idx ON accounts (parent_id);
