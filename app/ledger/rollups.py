"""Ledger rollups (migration 033): ledger entries summed per account, credit type and UTC hour
of `created_at`, so that a balance as of a past time (`GET …/balance-at`) reads sums instead of
the account's whole history.

A pass sums the entries written by transactions with `horizon_old <= xid < horizon_new` and
moves the cursor to `horizon_new`, the xmin of a snapshot taken in the pass: every transaction
below it has ended, so the entries it sums are final, and an entry committed late (a journal
entry a dead process left, flushed by another with its decision time) has an xid at or above
the horizon and is summed by a later pass. One process at a time: the cursor row is taken with
`SKIP LOCKED`; the others skip the pass.

A balance as of `at` is, read in one repeatable-read snapshot, H being the hour of `at`:
- the sums of the hours before H (what the passes summed);
- the entries made in H up to `at` that were written in order, read through the account's
  index between two ids (`ledger_id_marks`, below): summed or not;
- those written late (a journal entry a dead process left, flushed by another): from
  `ledger_late` when summed, else among the entries no pass has summed yet;
- the entries made before H that no pass has summed yet (xid at or above the horizon: a few
  seconds' worth of the table, found through the BRIN index on xid).
Each entry is in exactly one of them.

Marks: now and then a pass records the entry sequence's last value, with the time after it was
read. An entry is made (its `created_at`: the decision time of the app process that made it, or
Postgres's `now()`) before it is written, and its id is taken when it is written. So an entry
made at or after an instant T has a higher id than a mark taken before T (`lower`), and one
written before a mark has an id at or below that mark's. An entry made in hour H whose id is
above the first mark taken after H's end (`upper`) was written late: a pass that sums it
copies it to `ledger_late`; until such a mark is taken, every entry of H is read by id. The
app's clocks and Postgres's may differ: the marks are taken CLOCK_SLACK before H and after its
end. Without a mark before H (the hours before the first marks) H is read from id 0: right,
slower. Only those two marks of each hour are ever read: the others are dropped once two days
old (`prune_marks`). This holds with the sequence's default cache of 1 (ids handed out in the
order they are taken; a test fails if a migration changes it).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import asyncpg

from app.db import CUSTOM_PLANS, Connection, xid_window
from app.settings import CLOCK_SLACK

if TYPE_CHECKING:
    from app.context import AppContext

MARK_EVERY = timedelta(minutes=5)
# marks that no hour reads are dropped once this old (when a later pass takes a mark), looking
# this far back (a week's marks after a week without passes)
PRUNE_AFTER, PRUNE_SPAN = timedelta(days=2), timedelta(days=7)

# (the xid as a bigint: the BRIN index's expression, migration 033)
_XID = "(e.xid::text::int8)"
_SUMS = """COALESCE(sum(e.amount) FILTER (WHERE e.kind <> 'overage'), 0) AS balance,
           COALESCE(-sum(e.amount) FILTER (WHERE e.kind = 'overage'), 0)"""  # AS overage

# one entry's amount split as the sums are: (balance, overage)
_SPLIT = """CASE WHEN e.kind <> 'overage' THEN e.amount ELSE 0 END,
           CASE WHEN e.kind = 'overage' THEN -e.amount ELSE 0 END"""
_HOUR = "date_trunc('hour', e.created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"


def _lower(hour: str, slack: str) -> str:
    """The id of the last mark taken `slack` (CLOCK_SLACK) or more before `hour` (SQL
    expressions), NULL when there is none: every entry made in that hour has a higher id."""
    return (f"(SELECT m.last_id FROM ledger_id_marks m WHERE m.taken_at <= {hour} "
            f"- {slack}::interval ORDER BY m.taken_at DESC LIMIT 1)")


def _upper(hour: str, slack: str) -> str:
    """The id of the first mark taken `slack` (CLOCK_SLACK) after the end of `hour` (SQL
    expressions), NULL before there is one: an entry of that hour above it was written late.
    The one definition for the pass that copies late entries and the read that leaves them out
    of the hour's ids (were they to differ, an entry would be counted twice or not at all)."""
    return (f"(SELECT m.last_id FROM ledger_id_marks m WHERE m.taken_at >= {hour} "
            f"+ interval '1 hour' + {slack}::interval ORDER BY m.taken_at LIMIT 1)")


_ROLL = f"""
    INSERT INTO ledger_rollups AS r (account_id, credit_type_id, hour, entries, balance, overage)
    SELECT e.account_id, e.credit_type_id, {_HOUR}, count(*), {_SUMS}
    FROM ledger_entries e
    WHERE {_XID} >= $1 AND {_XID} < $2
    GROUP BY 1, 2, 3
    ON CONFLICT (account_id, credit_type_id, hour) DO UPDATE
        SET entries = r.entries + excluded.entries, balance = r.balance + excluded.balance,
            overage = r.overage + excluded.overage"""
# the same entries' late ones: above the first mark taken after their hour's end
_LATE = f"""
    WITH hours AS (
        SELECT h.hour, {_upper("h.hour", "$3")} AS upper
        FROM (SELECT DISTINCT {_HOUR} AS hour FROM ledger_entries e
              WHERE {_XID} >= $1 AND {_XID} < $2) h)
    INSERT INTO ledger_late (id, account_id, credit_type_id, created_at, balance, overage)
    SELECT e.id, e.account_id, e.credit_type_id, e.created_at, {_SPLIT}
    FROM ledger_entries e JOIN hours h ON h.hour = {_HOUR}
    WHERE {_XID} >= $1 AND {_XID} < $2 AND e.id > h.upper"""
NO_UPPER = 2**63 - 1


async def roll_up(conn: Connection, clock: datetime | None = None) -> int | None:
    """One pass: sum the entries written since the last pass into the rollups (and the late
    ones into ledger_late), and record a mark when due. Returns the rollup rows written, or
    None when there was nothing to sum or another process holds the cursor (then it writes
    nothing: no transaction id, no WAL, no mark). `clock`: the time its mark is taken at
    (default Postgres's clock: a test's timeline runs on its own)."""
    async with conn.transaction():
        window = await xid_window(
            conn, "ledger_rollup_cursor",
            f"SELECT EXISTS (SELECT 1 FROM ledger_entries e WHERE {_XID} >= $1 AND {_XID} < $2)")
        if window is None:
            return None
        old, new = window
        await _mark(conn, clock)  # (under the cursor's lock: marks are taken one at a time, in order)
        status = await conn.execute(_ROLL, old, new)
        await conn.execute(_LATE, old, new, CLOCK_SLACK)
        await conn.execute("UPDATE ledger_rollup_cursor SET horizon = $1, updated_at = now() "
                           "WHERE id = 1", new)
    return int(status.split()[-1])


async def _mark(conn: Connection, clock: datetime | None) -> None:
    """The sequence's last value, with a time taken after it was read, when the latest mark is
    MARK_EVERY old. One process at a time (the caller holds the cursor), so a mark's time and
    value are both above the ones before it: the first mark after an hour is the same mark for
    the pass that sorts that hour's entries into late or not and for every read after it."""
    if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM ledger_id_marks WHERE taken_at > "
                           "COALESCE($2, clock_timestamp()) - $1::interval)", MARK_EVERY, clock):
        return
    last = await conn.fetchval("SELECT CASE WHEN is_called THEN last_value ELSE 0 END "
                               "FROM ledger_entries_id_seq")
    await conn.execute("INSERT INTO ledger_id_marks (taken_at, last_id) "
                       "VALUES (COALESCE($2, clock_timestamp()), $1) ON CONFLICT DO NOTHING",
                       last, clock)
    await prune_marks(conn, clock)


def _hour(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _serves(before: datetime, at: datetime, after: datetime) -> bool:
    """Whether the mark taken `at`, between the marks taken `before` and `after`, is some hour
    H's lower mark (the last taken CLOCK_SLACK or more before H: H - CLOCK_SLACK lies in
    [at, after)) or its upper one (the first taken CLOCK_SLACK or more after H's end: an hour
    H + 1 h lies in (before - CLOCK_SLACK, at - CLOCK_SLACK])."""
    start = at + CLOCK_SLACK
    first_hour = _hour(start) if _hour(start) == start else _hour(start) + timedelta(hours=1)
    return first_hour < after + CLOCK_SLACK or _hour(at - CLOCK_SLACK) > before - CLOCK_SLACK


async def prune_marks(conn: Connection, clock: datetime | None = None,
                      keep: timedelta = PRUNE_AFTER) -> int:
    """Drop the marks that no hour reads (all but each hour's lower and upper mark: about 48 a
    day of the 288 taken), of those taken from `keep` + PRUNE_SPAN to `keep` before the clock.
    What `_lower` and `_upper` find for every hour stays what it was: a mark that serves an
    hour is kept, and a mark taken later is taken after all of them. Returns the marks dropped.
    (Run by the pass that takes a mark, under the cursor's lock.)"""
    now = clock or await conn.fetchval("SELECT clock_timestamp()")
    lo, hi = now - keep - PRUNE_SPAN, now - keep
    times = [r["taken_at"] for r in await conn.fetch(
        """(SELECT taken_at FROM ledger_id_marks WHERE taken_at < $1
            ORDER BY taken_at DESC LIMIT 1)
           UNION ALL
           SELECT taken_at FROM ledger_id_marks WHERE taken_at >= $1 AND taken_at < $2
           UNION ALL
           (SELECT taken_at FROM ledger_id_marks WHERE taken_at >= $2 ORDER BY taken_at LIMIT 1)
           ORDER BY 1""", lo, hi)]
    drop = [at for before, at, after in zip(times, times[1:], times[2:], strict=False)
            if lo <= at < hi and not _serves(before, at, after)]
    if drop:
        await conn.execute("DELETE FROM ledger_id_marks WHERE taken_at = ANY($1::timestamptz[])",
                           drop)
    return len(drop)


async def roll_up_due(ctx: AppContext) -> int | None:
    """The workers' pass (every process; one at a time does it)."""
    async with ctx.pool.acquire() as conn:
        return await roll_up(conn)


async def balance_at(c: Connection, account_id: int, at: datetime) -> list[asyncpg.Record]:
    """Per credit type the account has entries of up to `at`: the sum of its entries other
    than overage (`balance`) and what its overage entries owe (`overage`), as of `at`."""
    hour = at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    async with c.transaction(isolation="repeatable_read", readonly=True):
        # (in one round trip; the sums below are planned with these values, not as unknowns)
        found = await c.fetchrow(
            f"""SELECT {CUSTOM_PLANS}, horizon, COALESCE({_lower('$1::timestamptz', '$2')}, 0),
                       COALESCE({_upper('$1::timestamptz', '$2')}, $3)
                FROM ledger_rollup_cursor WHERE id = 1""", hour, CLOCK_SLACK, NO_UPPER)
        assert found is not None  # (migration 033 wrote the cursor's one row)
        _, horizon, lower, upper = found
        return await c.fetch(
            f"""WITH parts AS (
                  SELECT r.credit_type_id, r.balance, r.overage
                  FROM ledger_rollups r WHERE r.account_id = $1 AND r.hour < $2
                  UNION ALL
                  SELECT ct.id, s.balance, s.overage
                  FROM credit_types ct CROSS JOIN LATERAL (
                      SELECT {_SUMS} AS overage
                      FROM ledger_entries e
                      WHERE e.account_id = $1 AND e.credit_type_id = ct.id AND e.id > $4
                        AND e.id <= $5 AND e.created_at >= $2 AND e.created_at <= $3
                      HAVING count(*) > 0) s
                  UNION ALL
                  SELECT l.credit_type_id, l.balance, l.overage
                  FROM ledger_late l
                  WHERE l.account_id = $1 AND l.created_at >= $2 AND l.created_at <= $3
                  UNION ALL
                  SELECT e.credit_type_id, {_SPLIT}
                  FROM ledger_entries e
                  WHERE {_XID} >= $6 AND e.account_id = $1 AND e.created_at <= $3
                    AND (e.created_at < $2 OR e.id > $5))
                SELECT ct.code AS credit_type, ct.decimal_places, sum(p.balance) AS balance,
                       sum(p.overage) AS overage
                FROM parts p JOIN credit_types ct ON ct.id = p.credit_type_id
                GROUP BY ct.code, ct.decimal_places ORDER BY ct.code""",
            account_id, hour, at, lower, upper, horizon)
