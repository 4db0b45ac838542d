-- Where the workers' scan for unsent rated debits has got to, shared by every process and kept
-- across restarts (app/rating/drawdown.py: send_unsent). Before, each process kept its cursor
-- in memory only, so every start of every process read every rated debit of the last 7 days
-- with an anti-join on usage_events: at 100 rated debits/s, 60 million rows per deploy and per
-- process. A position (created_at, account_id, uid) means: every rated debit before it was
-- found sent, or was sent again, by the process that stored it. It only moves forward.
CREATE TABLE worker_cursors (
    name        text PRIMARY KEY,
    created_at  timestamptz NOT NULL,
    account_id  bigint NOT NULL,
    uid         text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
