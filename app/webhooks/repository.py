"""SQL of webhook endpoints, deliveries and attempts (the outbox insert is in outbox.py)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from app.db import Conn, Connection
from app.webhooks.outbox import OutboxEvent, notify

_DELIVERY = """SELECT d.id, d.event_id, e.type AS event_type, d.endpoint_id, d.status,
                      d.attempts AS attempt_count,
                      CASE WHEN d.status = 'pending' THEN d.next_attempt_at END AS next_attempt_at,
                      d.last_status, d.last_error, d.delivered_at, d.created_at
               FROM webhook_deliveries d JOIN webhook_events e ON e.id = d.event_id"""


# --- endpoints -----------------------------------------------------------------------------


async def insert_endpoint(conn: Conn, url: str, description: str, event_types: list[str] | None,
                          enabled: bool, secret: str) -> asyncpg.Record:
    row = await conn.fetchrow(
        """INSERT INTO webhook_endpoints (url, description, event_types, enabled, secret,
                                          disabled_reason)
           VALUES ($1, $2, $3, $4, $5, CASE WHEN $4 THEN NULL ELSE 'disabled when created' END)
           RETURNING *""",
        url, description, event_types, enabled, secret)
    assert row is not None
    return row


async def endpoint_by_id(conn: Conn, endpoint_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM webhook_endpoints WHERE id = $1", endpoint_id)


async def list_endpoints(conn: Conn, after_id: int, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT * FROM webhook_endpoints WHERE id > $1 ORDER BY id LIMIT $2", after_id, limit)


async def update_endpoint(conn: Conn, endpoint_id: int, changes: dict[str, Any]) -> asyncpg.Record | None:
    """Apply url/description/event_types/enabled; (re-)enabling starts a clean streak."""
    assert set(changes) <= {"url", "description", "event_types", "enabled"}
    sets = [f"{col} = ${i + 2}" for i, col in enumerate(changes)]
    if "enabled" in changes:
        sets.append(
            """disabled_reason = CASE WHEN enabled = {v} THEN disabled_reason
                                      WHEN {v} THEN NULL ELSE 'disabled by an admin' END,
               failing_since = CASE WHEN {v} AND NOT enabled THEN NULL ELSE failing_since END"""
            .format(v=f"${list(changes).index('enabled') + 2}::boolean"))
    # SET evaluates every right-hand side on the old row, so the CASEs see the old `enabled`
    return await conn.fetchrow(
        f"UPDATE webhook_endpoints SET {', '.join(sets)}, updated_at = now() WHERE id = $1 "
        "RETURNING *", endpoint_id, *changes.values())


async def rotate_secret(conn: Conn, endpoint_id: int, secret: str,
                        overlap: timedelta) -> asyncpg.Record | None:
    return await conn.fetchrow(
        """UPDATE webhook_endpoints SET previous_secret = secret, secret = $2,
                  previous_secret_expires_at = now() + $3::interval, updated_at = now()
           WHERE id = $1 RETURNING *""", endpoint_id, secret, overlap)


async def disable_endpoint(conn: Connection, endpoint_id: int, reason: str) -> asyncpg.Record | None:
    """Disable an enabled endpoint and cancel what it still has pending; None if it was not
    enabled (someone else disabled it first)."""
    row = await conn.fetchrow(
        """UPDATE webhook_endpoints SET enabled = false, disabled_reason = $2, updated_at = now()
           WHERE id = $1 AND enabled RETURNING *""", endpoint_id, reason)
    if row is not None:
        await cancel_pending(conn, endpoint_id, "endpoint disabled")
    return row


async def cancel_pending(conn: Conn, endpoint_id: int, reason: str) -> None:
    await conn.execute(
        """UPDATE webhook_deliveries SET status = 'cancelled', last_error = $2
           WHERE id IN (SELECT id FROM webhook_deliveries WHERE endpoint_id = $1
                        AND status = 'pending' ORDER BY id FOR UPDATE)""", endpoint_id, reason)


# --- events --------------------------------------------------------------------------------


async def insert_event_for(conn: Conn, event: OutboxEvent, endpoint_id: int) -> int:
    """Insert an event with one delivery, to this endpoint only (what `send-test` publishes)."""
    delivery_id: int = await conn.fetchval(
        """WITH e AS (INSERT INTO webhook_events (id, type, payload, created_at)
                      VALUES ($1, $2, $3::jsonb, $4) RETURNING id)
           INSERT INTO webhook_deliveries (event_id, endpoint_id) SELECT e.id, $5 FROM e
           RETURNING id""",
        event.id, event.type, event.payload(), event.created_at, endpoint_id)
    await notify(conn)
    return delivery_id


async def event_by_id(conn: Conn, event_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT id, type, created_at, payload::text AS payload FROM webhook_events WHERE id = $1",
        event_id)


# --- dispatch ------------------------------------------------------------------------------


async def claim(conn: Conn, limit: int, full: Sequence[int], some: Sequence[int],
                room: Sequence[int], per_endpoint: int, lease: timedelta) -> list[asyncpg.Record]:
    """Take up to `limit` due deliveries for one attempt each: none of the `full` endpoints,
    at most room[i] of endpoint some[i], at most `per_endpoint` of any other.

    The claim is one statement: the rows are locked (SKIP LOCKED: dispatchers never wait on
    each other), their `attempts` go up by one and `next_attempt_at` moves past the lease, so
    no other dispatcher takes them until the lease ends. The new `attempts` is the claim's
    token: recording the outcome checks it, so a claim whose lease ran out cannot overwrite
    a newer one.
    """
    return await conn.fetch(
        """WITH due AS (
               SELECT id, endpoint_id FROM webhook_deliveries
               WHERE status = 'pending' AND next_attempt_at <= now()
                 AND endpoint_id <> ALL($2::int8[])
               ORDER BY next_attempt_at LIMIT $1 * 4
           ), ranked AS (
               SELECT due.id, COALESCE(r.n, $5) AS room,
                      row_number() OVER (PARTITION BY due.endpoint_id ORDER BY due.id) AS nth
               FROM due LEFT JOIN unnest($3::int8[], $4::int4[]) AS r(endpoint_id, n)
                    ON r.endpoint_id = due.endpoint_id
           ), picked AS (
               SELECT d.id FROM webhook_deliveries d JOIN ranked r ON r.id = d.id
               WHERE r.nth <= r.room AND d.status = 'pending' AND d.next_attempt_at <= now()
               ORDER BY d.next_attempt_at LIMIT $1
               FOR UPDATE OF d SKIP LOCKED
           )
           UPDATE webhook_deliveries d
           SET attempts = d.attempts + 1, next_attempt_at = now() + $6::interval
           FROM picked p, webhook_events e, webhook_endpoints w
           WHERE d.id = p.id AND e.id = d.event_id AND w.id = d.endpoint_id
           RETURNING d.id, d.attempts, d.retry_base, d.endpoint_id, d.event_id,
                     e.payload::text AS payload, w.url, w.enabled,
                     array_remove(ARRAY[w.secret, CASE WHEN w.previous_secret_expires_at > now()
                                                       THEN w.previous_secret END], NULL)
                         AS secrets""",
        limit, list(full), list(some), list(room), per_endpoint, lease)


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    return [[row[i] for row in rows] for i in range(width)]


async def record_outcomes(conn: Conn, attempts: Sequence[tuple[Any, ...]],
                          settled: Sequence[tuple[Any, ...]], released: Sequence[tuple[int, int]],
                          streaks: Sequence[tuple[int, bool, datetime | None]],
                          disable_after: timedelta) -> bool:
    """Write a batch of outcomes in one statement (so one round trip, atomic):

    - attempts: (delivery_id, attempt, attempted_at, status_code, latency_ms, error, excerpt)
      logged as they are;
    - settled: (delivery_id, claim, status, retry_in_s, last_status, last_error, delivered_at)
      applied only where that claim still holds the pending delivery;
    - released: (delivery_id, claim) never sent: due again, the claim not counted.

    Delivery rows are locked in id order, as every multi-row writer of deliveries does.
    Returns whether update_streaks has anything to do for `streaks` (a read: no endpoint row
    is locked here).
    """
    settled = sorted(settled, key=lambda r: (r[0], r[1]))
    return bool(await conn.fetchval(
        """WITH locked AS MATERIALIZED (
               SELECT id FROM webhook_deliveries
               WHERE id = ANY($1::int8[]) OR id = ANY($8::int8[]) ORDER BY id FOR UPDATE
           ), logged AS (
               INSERT INTO webhook_attempts (delivery_id, attempt, attempted_at, status_code,
                                             latency_ms, error, response_excerpt)
               SELECT * FROM unnest($10::int8[], $11::int4[], $12::timestamptz[], $13::int4[],
                                    $14::int4[], $15::text[], $16::text[])
           ), settled AS (
               UPDATE webhook_deliveries d
               SET status = x.status, last_status = COALESCE(x.code, d.last_status),
                   last_error = x.error, delivered_at = COALESCE(x.delivered_at, d.delivered_at),
                   next_attempt_at = CASE WHEN x.retry_in IS NULL THEN d.next_attempt_at
                                          ELSE now() + make_interval(secs => x.retry_in) END
               FROM unnest($1::int8[], $2::int4[], $3::text[], $4::float8[], $5::int4[],
                           $6::text[], $7::timestamptz[])
                    AS x(id, claim, status, retry_in, code, error, delivered_at), locked l
               WHERE d.id = x.id AND l.id = d.id AND d.attempts = x.claim
                 AND d.status = 'pending'
           ), released AS (
               UPDATE webhook_deliveries d
               SET attempts = d.attempts - 1, next_attempt_at = now()
               FROM unnest($8::int8[], $9::int4[]) AS x(id, claim), locked l
               WHERE d.id = x.id AND l.id = d.id AND d.attempts = x.claim
                 AND d.status = 'pending'
           )
           SELECT EXISTS (
               SELECT 1 FROM webhook_endpoints w
               JOIN unnest($17::int8[], $18::bool[], $19::timestamptz[]) AS s(id, reset, fail_at)
                 ON s.id = w.id
               WHERE w.failing_since IS DISTINCT FROM
                     CASE WHEN s.reset THEN s.fail_at ELSE COALESCE(w.failing_since, s.fail_at) END
                  OR (NOT s.reset AND w.enabled AND w.failing_since <= now() - $20::interval))""",
        *_columns(settled, 7), *_columns(sorted(released), 2), *_columns(attempts, 7),
        *_columns(streaks, 3), disable_after))


async def update_streaks(conn: Connection, rows: Sequence[tuple[int, bool, datetime | None]],
                         disable_after: timedelta) -> list[int]:
    """rows: (endpoint_id, succeeded since, first failure after the last success). Returns the
    enabled endpoints now failing for longer than `disable_after`."""
    if not rows:
        return []
    found = await conn.fetch(
        """WITH x AS (SELECT * FROM unnest($1::int8[], $2::bool[], $3::timestamptz[])
                      AS x(id, reset, fail_at)),
           changed AS (
               UPDATE webhook_endpoints w
               SET failing_since = CASE WHEN x.reset THEN x.fail_at
                                        ELSE COALESCE(w.failing_since, x.fail_at) END
               FROM x WHERE w.id = x.id
                 AND w.failing_since IS DISTINCT FROM
                     CASE WHEN x.reset THEN x.fail_at ELSE COALESCE(w.failing_since, x.fail_at) END
               RETURNING w.id, w.enabled, w.failing_since)
           SELECT id FROM changed WHERE enabled AND failing_since <= now() - $4::interval
           UNION
           SELECT w.id FROM webhook_endpoints w JOIN x ON x.id = w.id
           WHERE NOT x.reset AND w.enabled AND w.failing_since <= now() - $4::interval""",
        *_columns(sorted(rows, key=lambda r: r[0]), 3), disable_after)
    return sorted(r["id"] for r in found)


# --- the delivery log ----------------------------------------------------------------------


async def list_deliveries(conn: Conn, before_id: int, limit: int, endpoint_id: int | None,
                          event_id: str | None, event_type: str | None,
                          status: str | None) -> list[asyncpg.Record]:
    """Newest first; every filter optional."""
    return await conn.fetch(
        _DELIVERY + """ WHERE ($1 = 0 OR d.id < $1) AND ($3::int8 IS NULL OR d.endpoint_id = $3)
                          AND ($4::text IS NULL OR d.event_id = $4)
                          AND ($5::text IS NULL OR e.type = $5)
                          AND ($6::text IS NULL OR d.status = $6)
                        ORDER BY d.id DESC LIMIT $2""",
        before_id, limit, endpoint_id, event_id, event_type, status)


async def deliveries_by_id(conn: Conn, ids: Sequence[int]) -> list[asyncpg.Record]:
    return await conn.fetch(_DELIVERY + " WHERE d.id = ANY($1::int8[]) ORDER BY d.id", list(ids))


async def attempts_of(conn: Conn, delivery_ids: Sequence[int]) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT * FROM webhook_attempts WHERE delivery_id = ANY($1::int8[]) ORDER BY id",
        list(delivery_ids))


async def replay_event(conn: Conn, event_id: str, endpoint_id: int | None) -> list[int]:
    """Queue the event again: for one endpoint (a new delivery if it never had one), or for
    every enabled endpoint that had it. The retry schedule starts over."""
    rows = await conn.fetch(
        """INSERT INTO webhook_deliveries (event_id, endpoint_id)
           SELECT $1, w.id FROM webhook_endpoints w
           WHERE w.enabled AND (w.id = $2 OR ($2::int8 IS NULL AND EXISTS (
                 SELECT 1 FROM webhook_deliveries d WHERE d.event_id = $1 AND d.endpoint_id = w.id)))
           ON CONFLICT (event_id, endpoint_id) DO UPDATE
           SET status = 'pending', next_attempt_at = now(),
               retry_base = webhook_deliveries.attempts, last_error = NULL
           RETURNING id""", event_id, endpoint_id)
    if rows:
        await notify(conn)
    return sorted(r["id"] for r in rows)


async def replay_failed(conn: Conn, since: datetime, endpoint_id: int | None) -> int:
    """Queue again every failed or cancelled delivery of an enabled endpoint for the events
    created at or after `since`."""
    status = await conn.execute(
        """UPDATE webhook_deliveries d
           SET status = 'pending', next_attempt_at = now(), retry_base = d.attempts,
               last_error = NULL
           WHERE d.id IN (
               SELECT d.id FROM webhook_deliveries d
               JOIN webhook_events e ON e.id = d.event_id
               JOIN webhook_endpoints w ON w.id = d.endpoint_id
               WHERE w.enabled AND d.status IN ('failed', 'cancelled') AND e.created_at >= $1
                 AND ($2::int8 IS NULL OR d.endpoint_id = $2)
               ORDER BY d.id FOR UPDATE OF d)""", since, endpoint_id)
    replayed = int(status.split()[-1])
    if replayed:
        await notify(conn)
    return replayed


# --- retention --------------------------------------------------------------------------


async def purge_settled(conn: Conn, older_than: timedelta, limit: int) -> int:
    """Delete up to `limit` events older than `older_than` that no delivery is still pending
    for, oldest first, with their deliveries and attempts; how many events went. A delivery
    made pending again meanwhile (replay-failed) keeps its event: the foreign key then fails
    the statement and nothing is deleted in this pass."""
    gone = await conn.fetchval(
        """WITH old AS (
             SELECT e.id FROM webhook_events e
             WHERE e.created_at < now() - $1::interval
               AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d
                               WHERE d.event_id = e.id AND d.status = 'pending')
             ORDER BY e.created_at LIMIT $2),
           dl AS (SELECT d.id FROM webhook_deliveries d JOIN old ON d.event_id = old.id),
           attempts AS (DELETE FROM webhook_attempts a USING dl WHERE a.delivery_id = dl.id),
           deliveries AS (DELETE FROM webhook_deliveries d USING dl
                          WHERE d.id = dl.id AND d.status <> 'pending'),
           events AS (DELETE FROM webhook_events e USING old WHERE e.id = old.id RETURNING 1)
           SELECT count(*) FROM events""", older_than, limit)
    return int(gone)


# --- watching (the CLI) --------------------------------------------------------------------


async def last_ids(conn: Conn) -> tuple[int, int]:
    row = await conn.fetchrow(
        """SELECT (SELECT COALESCE(max(id), 0) FROM webhook_deliveries) AS delivery,
                  (SELECT COALESCE(max(id), 0) FROM webhook_attempts) AS attempt""")
    assert row is not None
    return int(row["delivery"]), int(row["attempt"])


async def deliveries_after(conn: Conn, after_id: int, endpoint_id: int | None) -> list[asyncpg.Record]:
    return await conn.fetch(
        _DELIVERY + """ WHERE d.id > $1 AND ($2::int8 IS NULL OR d.endpoint_id = $2)
                        ORDER BY d.id LIMIT 1000""", after_id, endpoint_id)


async def attempts_after(conn: Conn, after_id: int, endpoint_id: int | None) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT a.*, d.event_id, e.type AS event_type, d.endpoint_id, d.status,
                  d.next_attempt_at
           FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id
           JOIN webhook_events e ON e.id = d.event_id
           WHERE a.id > $1 AND ($2::int8 IS NULL OR d.endpoint_id = $2)
           ORDER BY a.id LIMIT 1000""", after_id, endpoint_id)
