"""SQL of balances, ledger entries and usage events."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import asyncpg

from app.db import Conn, Connection

if TYPE_CHECKING:
    from app.ledger.journal import Rows


async def write_rows(conn: Connection, rows: Rows, copy_from: int = 0) -> set[str]:
    """Insert a journal batch; returns the op keys whose entries were new. With `copy_from`
    rows or more (0: never), the usage events and ledger entries go in by COPY."""
    if rows.balances:
        await conn.execute(
            """INSERT INTO balances (id, account_id, credit_type_id, product_codes, priority,
                                     effective_at, expires_at, description, source)
               SELECT b.id, b.account_id, b.credit_type_id,
                      CASE WHEN b.products IS NULL THEN NULL
                           ELSE string_to_array(b.products, ',') END,
                      b.priority, b.effective_at, b.expires_at, b.description, b.source
               FROM unnest($1::int8[], $2::int8[], $3::int8[], $4::text[], $5::int4[],
                           $6::timestamptz[], $7::timestamptz[], $8::text[], $9::text[])
                    AS b(id, account_id, credit_type_id, products, priority, effective_at,
                         expires_at, description, source)
               ON CONFLICT (id) DO NOTHING""",
            *_columns([(b[0], b[1], b[2], ",".join(b[3]) if b[3] is not None else None, *b[4:])
                       for b in rows.balances], 9),
        )
    # usage events and ledger entries by COPY when there are many; else in one statement: a
    # batch of plain usage then needs no explicit transaction (one round trip, one commit)
    if 0 < copy_from <= len(rows.entries) + len(rows.usage) and await _copied(conn, rows):
        inserted = {e[0] for e in rows.entries}
    elif (encoded := _encoded(rows)) is None:  # a separator inside some text (a description, say)
        inserted = {r["op_key"] for r in await conn.fetch(
            _WRITE_ARRAYS,
            *_columns([(*e[:10], ms_to_dt(e[10]), e[11]) for e in rows.entries], 12),
            *_columns([(*u[:6], ms_to_dt(u[6]), ms_to_dt(u[7])) for u in rows.usage], 8))}
    elif not conn.is_in_transaction() and await _inserted_plain(conn, *encoded):
        inserted = {e[0] for e in rows.entries}
    else:
        inserted = {r["op_key"] for r in await conn.fetch(_WRITE_KEYED, *encoded)}
    if rows.holds:  # a hold's row, with its entries (app/entitlements/holds.py)
        await conn.execute(
            """INSERT INTO holds (account_id, uid, product_code, credit_type_id, amount, status,
                                  expires_at)
               SELECT h.a, h.u, h.p, h.ct, h.amt::numeric, 'held', h.x
               FROM unnest($1::int8[], $2::text[], $3::text[], $4::int8[], $5::text[],
                           $6::timestamptz[]) AS h(a, u, p, ct, amt, x)
               ON CONFLICT (account_id, uid) DO NOTHING""", *_columns(rows.holds, 6))
    if rows.statuses:
        await conn.execute(
            """UPDATE balances SET status = s.status
               FROM unnest($1::int8[], $2::text[]) AS s(id, status) WHERE balances.id = s.id""",
            *_columns(rows.statuses, 2),
        )
    return inserted


def _encoded(rows: Rows) -> tuple[str, str] | None:
    entries, usage = _encoded_entries(rows.entries), _encoded_usage(rows.usage)
    return None if entries is None or usage is None else (entries, usage)


# A large flush goes in by COPY: Postgres inserts its rows in bulk, for about half the CPU per
# usage event of the statement below (bench/flush.py), but with a transaction and two round
# trips per table, which only a large flush repays (CREDITGATE_JOURNAL_COPY_ROWS).
_USAGE_COLUMNS = ["account_id", "uid", "product_code", "credit_type_id", "amount", "overage",
                  "event_time", "recorded_at"]
_ENTRY_COLUMNS = ["op_key", "seq", "account_id", "balance_id", "credit_type_id", "kind",
                  "amount", "usage_uid", "product_code", "description", "created_at",
                  "journal_id"]
_COPY_NULL = "\\N"


async def _copied(conn: Connection, rows: Rows) -> bool:
    """The usual large flush: nothing of it is in yet, and COPY writes both tables. A row that
    is in already fails it whole and it is rolled back (to a savepoint inside the caller's
    transaction): False, and the caller goes the keyed way; False too when some text cannot
    travel in COPY's text format as it is (a tab or backslash in a description, say)."""
    texts = _copy_texts(rows)
    if texts is None:
        return False
    try:
        async with conn.transaction():
            if texts[0]:
                await conn.copy_to_table("usage_events", source=_once(texts[0]),
                                         columns=_USAGE_COLUMNS)
            if texts[1]:
                await conn.copy_to_table("ledger_entries", source=_once(texts[1]),
                                         columns=_ENTRY_COLUMNS)
    except asyncpg.UniqueViolationError:
        return False
    return True


async def _once(data: bytes) -> AsyncIterator[bytes]:
    """COPY's data in one piece (asyncpg would take plain bytes for a file's path)."""
    yield data


def _copy_texts(rows: Rows) -> tuple[bytes, bytes] | None:
    """Both tables' rows in COPY's text format (NULL as \\N), or None when a value holds a tab,
    newline, carriage return or backslash (the counts differ)."""
    times: dict[int, str] = {}

    def ts(ms: int) -> str:
        text = times.get(ms)
        if text is None:
            text = times[ms] = ms_to_dt(ms).isoformat()
        return text

    usage = "".join([f"{r[0]}\t{r[1]}\t{r[2]}\t{r[3]}\t{r[4]}\t{r[5]}\t{ts(r[6])}\t{ts(r[7])}\n"
                     for r in rows.usage])
    entries = "".join([
        f"{r[0]}\t{r[1]}\t{r[2]}\t{_COPY_NULL if r[3] is None else r[3]}\t{r[4]}\t{r[5]}\t{r[6]}"
        f"\t{_COPY_NULL if r[7] is None else r[7]}\t{_COPY_NULL if r[8] is None else r[8]}\t{r[9]}"
        f"\t{ts(r[10])}\t{r[11]}\n" for r in rows.entries])
    nulls = sum((r[3] is None) + (r[7] is None) + (r[8] is None) for r in rows.entries)
    if (usage.count("\t") != 7 * len(rows.usage) or usage.count("\n") != len(rows.usage)
            or entries.count("\t") != 11 * len(rows.entries)
            or entries.count("\n") != len(rows.entries)
            or "\r" in usage or "\r" in entries or "\\" in usage
            or entries.count("\\") != nulls):
        return None
    return usage.encode(), entries.encode()


async def _inserted_plain(conn: Connection, entries: str, usage: str) -> bool:
    """The usual flush: nothing of it is in yet, and a plain INSERT skips ON CONFLICT's per-row
    probe and confirmation (~18% of the statement). A row that is in already (a re-flush, a
    uid Redis forgot) fails it whole, changing nothing: False, and the caller goes the keyed
    way. Only outside a transaction (a failed statement would abort the caller's)."""
    try:
        await conn.execute(_WRITE_PLAIN, entries, usage)
    except asyncpg.UniqueViolationError:
        return False
    return True


# Rows travel as one text per table (fields joined by US, rows by RS, split again by
# Postgres): asyncpg's array encoding checked every element's type in Python, which cost more
# than the rest of a batch's journal work. Times are epoch milliseconds, turned into
# timestamps exactly (an interval is an integer count of microseconds).
SEP, EOL = "\x1f", "\x1e"
_MS = "'epoch'::timestamptz + ({})::int8 * interval '1 millisecond'"


def _write_encoded(keyed: bool) -> str:
    """Both tables from their texts ($1 entries, $2 usage); `keyed`: a row already in is
    skipped (`ON CONFLICT DO NOTHING`) and the op keys written are returned."""
    usage_conflict = "ON CONFLICT (account_id, uid) DO NOTHING" if keyed else ""
    entry_conflict = "ON CONFLICT (op_key, seq) DO NOTHING RETURNING op_key" if keyed else ""
    return f"""
    WITH u AS (SELECT string_to_array(line, E'\\x1f') AS f
               FROM unnest(string_to_array($2::text, E'\\x1e')) AS line),
         usage AS (
           INSERT INTO usage_events (account_id, uid, product_code, credit_type_id, amount,
                                     overage, event_time, recorded_at)
           SELECT f[1]::int8, f[2], f[3], f[4]::int8, f[5]::numeric, f[6]::numeric,
                  {_MS.format("f[7]")}, {_MS.format("f[8]")}
           FROM u
           {usage_conflict}),
         e AS (SELECT string_to_array(line, E'\\x1f') AS f
               FROM unnest(string_to_array($1::text, E'\\x1e')) AS line)
    INSERT INTO ledger_entries (op_key, seq, account_id, balance_id, credit_type_id, kind,
                                amount, usage_uid, product_code, description, created_at,
                                journal_id)
    SELECT f[1], f[2]::int2, f[3]::int8, NULLIF(f[4], '')::int8, f[5]::int8, f[6],
           f[7]::numeric, NULLIF(f[8], ''), NULLIF(f[9], ''), f[10], {_MS.format("f[11]")}, f[12]
    FROM e
    {entry_conflict}"""


_WRITE_KEYED, _WRITE_PLAIN = _write_encoded(keyed=True), _write_encoded(keyed=False)
_WRITE_ARRAYS = """
    WITH usage AS (
           INSERT INTO usage_events (account_id, uid, product_code, credit_type_id, amount,
                                     overage, event_time, recorded_at)
           SELECT * FROM unnest($13::int8[], $14::text[], $15::text[], $16::int8[],
                                $17::text[]::numeric[], $18::text[]::numeric[],
                                $19::timestamptz[], $20::timestamptz[])
           ON CONFLICT (account_id, uid) DO NOTHING)
    INSERT INTO ledger_entries (op_key, seq, account_id, balance_id, credit_type_id, kind,
                                amount, usage_uid, product_code, description, created_at,
                                journal_id)
    SELECT * FROM unnest($1::text[], $2::int2[], $3::int8[], $4::int8[], $5::int8[],
                         $6::text[], $7::text[]::numeric[], $8::text[], $9::text[],
                         $10::text[], $11::timestamptz[], $12::text[])
    ON CONFLICT (op_key, seq) DO NOTHING
    RETURNING op_key"""


def ms_to_dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)  # float-ok: a timestamp, not an amount


def _checked(lines: list[str], fields: int) -> str | None:
    """The rows as one text, or None when a separator hides in a value (the counts differ)."""
    text = EOL.join(lines)
    if text.count(SEP) != len(lines) * (fields - 1) or text.count(EOL) != max(len(lines) - 1, 0):
        return None
    return text


def _encoded_entries(rows: Sequence[tuple[Any, ...]]) -> str | None:
    # a NULL balance, usage uid or product travels as '' (no uid or code is empty)
    return _checked([
        f"{r[0]}\x1f{r[1]}\x1f{r[2]}\x1f{'' if r[3] is None else r[3]}\x1f{r[4]}\x1f{r[5]}"
        f"\x1f{r[6]}\x1f{'' if r[7] is None else r[7]}\x1f{'' if r[8] is None else r[8]}"
        f"\x1f{r[9]}\x1f{r[10]}\x1f{r[11]}" for r in rows], 12)


def _encoded_usage(rows: Sequence[tuple[Any, ...]]) -> str | None:
    return _checked([f"{r[0]}\x1f{r[1]}\x1f{r[2]}\x1f{r[3]}\x1f{r[4]}\x1f{r[5]}\x1f{r[6]}"
                     f"\x1f{r[7]}" for r in rows], 8)


def _columns(rows: Sequence[tuple[object, ...]], width: int) -> list[list[object]]:
    return [[row[i] for row in rows] for i in range(width)] if rows else [[] for _ in range(width)]


async def op_owners(conn: Conn, op_keys: list[str]) -> dict[str, str]:
    """Which journal entry wrote each of these operations."""
    rows = await conn.fetch(
        "SELECT op_key, journal_id FROM ledger_entries WHERE op_key = ANY($1::text[]) AND seq = 0",
        op_keys,
    )
    return {r["op_key"]: r["journal_id"] or "" for r in rows}


async def committed_ops(conn: Conn, op_keys: list[str]) -> set[str]:
    rows = await conn.fetch(
        "SELECT DISTINCT op_key FROM ledger_entries WHERE op_key = ANY($1::text[])", op_keys
    )
    return {r["op_key"] for r in rows}


async def root_accounts(conn: Conn, root_id: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT id, parent_id, status FROM accounts WHERE root_id = $1 ORDER BY id", root_id
    )


# A balance's remaining amount: its snapshot (migration 025, app/ledger/snapshots.py) plus the
# entries after the snapshot's horizon (all of them when it has none): an index range, however
# long the balance's history.
REMAINING = """COALESCE(s.amount, 0) + COALESCE((
                   SELECT sum(e.amount) FROM ledger_entries e
                   WHERE e.balance_id = b.id AND e.xid >= COALESCE(s.horizon, '0')), 0)"""


async def live_balances(conn: Conn, account_ids: list[int]) -> list[asyncpg.Record]:
    """Balances that can be drawn (pending ones wait outside the hot state), with remaining =
    the sum of their entries."""
    return await conn.fetch(
        f"""SELECT b.id, b.account_id, ct.code AS credit_type, ct.decimal_places, b.product_codes,
                  b.priority, b.effective_at, b.expires_at, b.status, {REMAINING} AS remaining
           FROM balances b JOIN credit_types ct ON ct.id = b.credit_type_id
           LEFT JOIN balance_snapshots s ON s.balance_id = b.id
           WHERE b.account_id = ANY($1::int8[]) AND b.status = 'active'""",
        account_ids,
    )


async def overages(conn: Conn, account_ids: list[int]) -> list[asyncpg.Record]:
    """What each account owes per credit type: snapshot plus the overage entries after it, one
    index range per account and credit type."""
    return await conn.fetch(
        """SELECT * FROM (
               SELECT a.id AS account_id, ct.code AS credit_type, ct.decimal_places,
                      -(COALESCE(s.amount, 0) + COALESCE((
                          SELECT sum(e.amount) FROM ledger_entries e
                          WHERE e.kind = 'overage' AND e.account_id = a.id
                            AND e.credit_type_id = ct.id
                            AND e.xid >= COALESCE(s.horizon, '0')), 0)) AS overage
               FROM unnest($1::int8[]) AS a (id) CROSS JOIN credit_types ct
               LEFT JOIN overage_snapshots s ON s.account_id = a.id AND s.credit_type_id = ct.id
           ) o WHERE overage <> 0""",
        account_ids,
    )


async def next_balance_id(conn: Conn) -> int:
    return int(await conn.fetchval("SELECT nextval('balances_id_seq')"))


_BALANCE = f"""SELECT b.*, a.code AS account, a.root_id, ct.code AS credit_type, ct.decimal_places,
                     {REMAINING} AS remaining,
                     COALESCE((SELECT sum(amount) FROM ledger_entries e
                               WHERE e.balance_id = b.id AND e.kind = 'grant'), 0) AS granted
              FROM balances b JOIN accounts a ON a.id = b.account_id
              JOIN credit_types ct ON ct.id = b.credit_type_id
              LEFT JOIN balance_snapshots s ON s.balance_id = b.id"""


async def balance(conn: Conn, balance_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(_BALANCE + " WHERE b.id = $1", balance_id)


async def account_balances(conn: Conn, account_id: int, after_id: int, limit: int,
                           status: str | None = None,
                           credit_type_id: int | None = None) -> list[asyncpg.Record]:
    return await conn.fetch(
        _BALANCE + """ WHERE b.account_id = $1 AND b.id > $2
                         AND ($4::text IS NULL OR b.status = $4)
                         AND ($5::int8 IS NULL OR b.credit_type_id = $5)
                       ORDER BY b.id LIMIT $3""",
        account_id, after_id, limit, status, credit_type_id,
    )


async def ledger_page(
    conn: Conn, account_id: int, credit_type_id: int | None, after_id: int, limit: int
) -> list[asyncpg.Record]:
    """Entries in order, each with `in_page`: the sum of its credit type's entries on this page
    up to it (the caller adds what came before the page)."""
    return await conn.fetch(
        """WITH page AS (
               SELECT * FROM ledger_entries
               WHERE account_id = $1 AND ($2::int8 IS NULL OR credit_type_id = $2) AND id > $3
               ORDER BY id LIMIT $4)
           SELECT p.*, ct.code AS credit_type, ct.decimal_places,
                  sum(p.amount) OVER (PARTITION BY p.credit_type_id ORDER BY p.id) AS in_page
           FROM page p JOIN credit_types ct ON ct.id = p.credit_type_id
           ORDER BY p.id""",
        account_id, credit_type_id, after_id, limit,
    )


async def ledger_before(conn: Conn, account_id: int, credit_type_id: int | None,
                        before_id: int) -> dict[int, Decimal]:
    """Per credit type (or just one), the sum of the account's entries with ids up to
    `before_id`, in one pass: the running balances before a page whose cursor does not carry
    them (a cursor of the older shape)."""
    rows = await conn.fetch(
        """SELECT credit_type_id, sum(amount) AS total FROM ledger_entries
           WHERE account_id = $1 AND ($2::int8 IS NULL OR credit_type_id = $2) AND id <= $3
           GROUP BY credit_type_id""", account_id, credit_type_id, before_id)
    return {r["credit_type_id"]: Decimal(r["total"]) for r in rows}


async def usage_exists(conn: Conn, account_id: int, uids: list[str]) -> set[str]:
    rows = await conn.fetch(
        "SELECT uid FROM usage_events WHERE account_id = $1 AND uid = ANY($2::text[])",
        account_id, uids,
    )
    return {r["uid"] for r in rows}


async def usage_event(conn: Conn, account_id: int, uid: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT * FROM usage_events WHERE account_id = $1 AND uid = $2", account_id, uid)


async def usage_entries(conn: Conn, account_id: int, usage_uid: str) -> list[asyncpg.Record]:
    """A usage debit's entries in drawdown order: one per balance drawn (with the code of the
    account that owns it), then its overage if any (`balance_id` null)."""
    return await conn.fetch(
        """SELECT e.seq, e.balance_id, e.amount, a.code AS owner FROM ledger_entries e
           JOIN accounts a ON a.id = e.account_id
           WHERE e.op_key = $1 ORDER BY e.seq""",
        f"u:{account_id}:{usage_uid}")


async def insert_overage_credit(conn: Conn, op: str, account_id: int, credit_type_id: int,
                                amount: Decimal, uid: str | None, product: str | None,
                                description: str) -> bool:
    """Reverse overage: an `overage` ledger entry with a positive amount (what the account owes
    goes down), once per op key. The hot copy's overage is refreshed by the caller."""
    found = await conn.fetchval(
        """INSERT INTO ledger_entries (op_key, seq, account_id, balance_id, credit_type_id, kind,
                                       amount, usage_uid, product_code, description, created_at)
           VALUES ($1, 0, $2, NULL, $3, 'overage', $4, $5, $6, $7, now())
           ON CONFLICT (op_key, seq) DO NOTHING RETURNING 1""",
        op, account_id, credit_type_id, amount, uid, product, description)
    return found is not None


async def due_expiries(conn: Conn, now: datetime, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT b.id, b.account_id FROM balances b
           WHERE b.status = 'active' AND b.expires_at IS NOT NULL AND b.expires_at <= $1
           ORDER BY b.expires_at LIMIT $2""",
        now, limit,
    )



async def thresholds(conn: Conn, account_ids: list[int]) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT t.account_id, ct.code AS credit_type, ct.decimal_places, t.low
           FROM balance_thresholds t JOIN credit_types ct ON ct.id = t.credit_type_id
           WHERE t.account_id = ANY($1::int8[])""",
        account_ids,
    )


async def watches(conn: Conn, account_ids: list[int]) -> list[asyncpg.Record]:
    """Every threshold the hot state watches: `low` (balance.low, below) and `recharge`
    (enabled auto-recharge, to or below)."""
    return await conn.fetch(
        """SELECT t.account_id, 'low' AS name, ct.code AS credit_type, ct.decimal_places,
                  t.low AS threshold, 'lt' AS op
           FROM balance_thresholds t JOIN credit_types ct ON ct.id = t.credit_type_id
           WHERE t.account_id = ANY($1::int8[])
           UNION ALL
           SELECT r.account_id, 'recharge', ct.code, ct.decimal_places, r.threshold, 'le'
           FROM auto_recharge_configs r JOIN credit_types ct ON ct.id = r.credit_type_id
           WHERE r.account_id = ANY($1::int8[]) AND r.enabled""",
        account_ids,
    )


async def set_threshold(conn: Conn, account_id: int, credit_type_id: int, low: Decimal | None) -> None:
    if low is None:
        await conn.execute(
            "DELETE FROM balance_thresholds WHERE account_id = $1 AND credit_type_id = $2",
            account_id, credit_type_id)
        return
    await conn.execute(
        """INSERT INTO balance_thresholds (account_id, credit_type_id, low) VALUES ($1, $2, $3)
           ON CONFLICT (account_id, credit_type_id) DO UPDATE SET low = $3, updated_at = now()""",
        account_id, credit_type_id, low)


async def insert_pending_balance(
    conn: Conn, balance_id: int, account_id: int, credit_type_id: int, products: list[str] | None,
    priority: int, effective_at: datetime, expires_at: datetime | None, description: str,
    source: str,
) -> None:
    await conn.execute(
        """INSERT INTO balances (id, account_id, credit_type_id, product_codes, priority,
                                 effective_at, expires_at, description, source, status)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'pending')""",
        balance_id, account_id, credit_type_id, products, priority, effective_at, expires_at,
        description, source)


async def void_pending_balance(conn: Conn, balance_id: int) -> bool:
    result = await conn.execute(
        "UPDATE balances SET status = 'voided' WHERE id = $1 AND status = 'pending'", balance_id)
    return result.endswith(" 1")


async def recent_uids(conn: Conn, account_ids: list[int], since: datetime) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT account_id, uid, recorded_at FROM usage_events
           WHERE account_id = ANY($1::int8[]) AND recorded_at >= $2""",
        account_ids, since,
    )


# --- recurring grants (app/ledger/recurring_grants.py) -------------------------------------

_RECURRING = """SELECT g.*, a.code AS account, a.root_id, ct.code AS credit_type,
                       ct.decimal_places
                FROM recurring_grants g JOIN accounts a ON a.id = g.account_id
                JOIN credit_types ct ON ct.id = g.credit_type_id"""


async def insert_recurring_grant(conn: Conn, values: dict[str, Any]) -> int:
    return int(await conn.fetchval(
        """INSERT INTO recurring_grants (account_id, credit_type_id, amount, frequency,
                                         interval_count, start_date, end_date, product_codes,
                                         priority, description, rollover_percent, rollover_max,
                                         next_start, account_plan_id, plan_credit_id, anchor_date)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $6, $13, $14, $15)
           RETURNING id""",
        values["account_id"], values["credit_type_id"], values["amount"], values["frequency"],
        values["interval"], values["start"], values["end"], values["products"],
        values["priority"], values["description"], values["rollover_percent"],
        values["rollover_max"], values.get("account_plan_id"), values.get("plan_credit_id"),
        values.get("anchor")))


async def recurring_grant(conn: Conn, grant_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(f"{_RECURRING} WHERE g.id = $1", grant_id)


async def recurring_grants_of(conn: Conn, account_id: int, after_id: int,
                              limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(f"{_RECURRING} WHERE g.account_id = $1 AND g.id > $2 "
                            "ORDER BY g.id LIMIT $3", account_id, after_id, limit)


async def due_recurring_grants(conn: Conn, today: date, limit: int) -> list[asyncpg.Record]:
    """Grants with a period to grant: one starting today or earlier, before their end."""
    return await conn.fetch(
        f"""{_RECURRING} WHERE g.next_start <= $1
              AND (g.end_date IS NULL OR g.next_start < g.end_date)
            ORDER BY g.next_start, g.id LIMIT $2""", today, limit)


async def end_recurring_grant(conn: Conn, grant_id: int, end: date) -> None:
    await conn.execute("UPDATE recurring_grants SET end_date = $2 WHERE id = $1", grant_id, end)


async def end_plan_grants(conn: Conn, account_plan_id: int, end: date) -> None:
    """An account plan's included credits end with it (its end just set)."""
    await conn.execute("UPDATE recurring_grants SET end_date = $2 WHERE account_plan_id = $1",
                       account_plan_id, end)


async def reserve_period(conn: Conn, grant_id: int, start: date, end: date) -> int:
    """The balance id of a period, reserved once whoever asks first (a reservation committed
    by another transaction while this statement ran is read by the next try)."""
    while True:
        found = await conn.fetchval(
            """WITH new AS (
                 INSERT INTO recurring_grant_periods (recurring_grant_id, period_start, period_end,
                                                      balance_id)
                 VALUES ($1, $2, $3, nextval('balances_id_seq'))
                 ON CONFLICT (recurring_grant_id, period_start) DO NOTHING RETURNING balance_id)
               SELECT balance_id FROM new
               UNION ALL
               SELECT balance_id FROM recurring_grant_periods
               WHERE recurring_grant_id = $1 AND period_start = $2
               LIMIT 1""", grant_id, start, end)
        if found is not None:
            return int(found)


async def advance_recurring_grant(conn: Conn, grant_id: int, next_start: date) -> None:
    await conn.execute(
        "UPDATE recurring_grants SET next_start = greatest(next_start, $2) WHERE id = $1",
        grant_id, next_start)


async def periods_of(conn: Conn, grant_id: int, limit: int = 100) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT period_start, period_end, balance_id, rolled FROM recurring_grant_periods
           WHERE recurring_grant_id = $1 ORDER BY period_start DESC LIMIT $2""",
        grant_id, limit)


async def unrolled_periods(conn: Conn, today: date, limit: int) -> list[asyncpg.Record]:
    """Periods over (their balance expired at the end's midnight) not rolled over yet, each
    with the next period's balance when it was granted; of one recurring grant only the
    earliest (a period is settled after the one before it rolled into it)."""
    return await conn.fetch(
        f"""SELECT p.period_start, p.period_end, p.balance_id, n.balance_id AS next_balance_id,
                   x.* FROM recurring_grant_periods p
            JOIN ({_RECURRING}) x ON x.id = p.recurring_grant_id
            LEFT JOIN recurring_grant_periods n ON n.recurring_grant_id = p.recurring_grant_id
                                                AND n.period_start = p.period_end
            WHERE NOT p.rolled AND p.period_end <= $1
              AND NOT EXISTS (SELECT 1 FROM recurring_grant_periods e
                              WHERE e.recurring_grant_id = p.recurring_grant_id
                                AND e.period_start < p.period_start AND NOT e.rolled)
            ORDER BY p.period_end LIMIT $2""", today, limit)


async def mark_rolled(conn: Conn, grant_id: int, period_start: date) -> None:
    await conn.execute(
        """UPDATE recurring_grant_periods SET rolled = true
           WHERE recurring_grant_id = $1 AND period_start = $2""", grant_id, period_start)


async def op_amount(conn: Conn, op_key: str) -> Decimal | None:
    """The sum of an operation's entries; None when it is not committed."""
    found = await conn.fetchval(
        "SELECT sum(amount) FROM ledger_entries WHERE op_key = $1", op_key)
    return None if found is None else Decimal(found)
