"""The outbox: events are written in the transaction of the change that caused them, with one
pending delivery per subscribed endpoint. Event ids derive from the causing operation, so a
re-flushed journal record cannot publish an event twice."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg

from app.db import Conn, Connection
from app.errors import STORE_ERRORS
from app.ledger.repository import ms_to_dt
from app.money import scaled_text

if TYPE_CHECKING:
    from app.ledger.journal import JournalRecord

log = logging.getLogger(__name__)
FLAG_EVENTS = {"revoked": ("balance.depleted", "entitlement.revoked"),
               "granted": ("balance.recovered", "entitlement.granted")}
BALANCE_EVENTS = {"grant": "credits.granted", "void": "credits.voided", "expire": "credits.expired",
                  "refund": "credits.voided", "rollover": "credits.rolled_over",
                  "clawback": "credits.clawed_back"}


@dataclass(frozen=True)
class OutboxEvent:
    id: str
    type: str
    account_id: int | None
    sequence: int | None
    created_at: datetime
    data: dict[str, Any]

    def payload(self) -> str:
        data = dict(self.data)
        if self.sequence is not None:
            data["sequence"] = self.sequence
        return json.dumps({"type": self.type,
                           "timestamp": self.created_at.isoformat().replace("+00:00", "Z"),
                           "data": data})


def event_id(*parts: object) -> str:
    return "evt_" + hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:26]


def events_for(record: JournalRecord) -> list[OutboxEvent]:
    """The events one committed journal record raises."""
    if record.kind == "usage" and not record.flag_changes and not record.crossings:
        return []  # most of a batch: a debit that moved no flag and crossed no watch
    p = record.payload
    at = ms_to_dt(record.recorded_ms)
    dp = int(p["dp"])

    def amount(scaled: int) -> str:
        return scaled_text(scaled, dp)

    def make(kind: str, account: int, data: dict[str, Any], *key: object) -> OutboxEvent:
        return OutboxEvent(event_id(record.op_key, kind, *key), kind, account, record.sequence, at,
                           {"account": None, **data})

    events = []
    if record.kind == "pay" and record.applied:  # a purchase paid what the account owed
        events.append(make("overage.settled", int(p["a"]), {
            "credit_type": p["cc"], "reference": f"purchase:{p['purchase']}",
            "amount": amount(-record.applied), "purchase_id": p["purchase"],
            "balance_id": int(p["b"])}))
    if record.kind in BALANCE_EVENTS:
        data: dict[str, Any] = {"balance_id": int(p["b"]), "credit_type": p["cc"],
                                "amount": amount(abs(record.applied))}
        if record.kind == "grant":
            data["source"] = p["bal"]["source"]
        if record.kind == "rollover":  # what expired unused in the period before
            data["from_balance_id"] = int(p["from"])
        if record.kind == "refund":  # what was already spent is now owed
            data |= {"reason": "refund", "overage": amount(record.overage)}
        if record.kind == "clawback":  # a partial refund's share; what was spent is owed
            data |= {"reason": "partial_refund", "overage": amount(record.overage),
                     "purchase_id": p["purchase"], "amount_refunded": p["refunded"]}
        events.append(make(BALANCE_EVENTS[record.kind], int(p["a"]), data))
    for change in filter(None, record.flag_changes.split(";")):
        product, ct, flip, available = change.split("|")
        for kind in FLAG_EVENTS[flip]:
            events.append(make(kind, int(p["a"]), {"product": product, "credit_type": ct,
                                                   "available": amount(int(available))}, product))
    for crossing in filter(None, record.crossings.split(";")):
        name, account, ct, total, threshold = crossing.split("|")
        if name == "low":
            events.append(make("balance.low", int(account), {
                "credit_type": ct, "threshold": amount(int(threshold)),
                "available": amount(int(total))}, account))
    return events


# Postgres NOTIFY channel of new pending deliveries: dispatchers (app/webhooks/dispatcher.py)
# LISTEN to it and claim at once. A transaction that notifies holds a global lock through its
# commit (notifying transactions commit one at a time), so the journal's flushes, the busy
# writer, do not notify: a task of theirs does after the commit (`Nudger`), in a transaction of
# its own that does not wait for its commit record to reach the disk. The other writers, rare,
# notify within their transaction.
CHANNEL = "creditgate_outbox"


async def notify(conn: Conn) -> None:
    """Wake the dispatchers (at the commit of the caller's transaction, if it is in one)."""
    await conn.execute("SELECT pg_notify($1, '')", CHANNEL)


class Nudger:
    """Wakes the dispatchers after commits, outside any transaction, with at most one
    notification waiting to be sent: commits that land while one waits are covered by it. A
    lost nudge only delays deliveries until a dispatcher's idle poll."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._waiting = False

    def after_commit(self, spawn: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        if not self._waiting:
            self._waiting = True
            spawn(self.notify())

    async def notify(self) -> None:
        try:
            async with self.pool.acquire() as conn:
                self._waiting = False  # a commit from now on needs a notification of its own
                await conn.execute("SELECT set_config('synchronous_commit', 'off', true), "
                                   "pg_notify($1, '')", CHANNEL)
        except STORE_ERRORS as exc:
            log.warning("could not notify the webhook dispatchers: %s", exc)
        finally:
            self._waiting = False


def _publish_sql(then: str) -> str:
    return f"""WITH new AS (
               INSERT INTO webhook_events (id, type, account_id, sequence, payload, created_at)
               SELECT e.id, e.type, e.account_id, e.sequence,
                      CASE WHEN a.code IS NULL THEN e.payload::jsonb
                           ELSE jsonb_set(e.payload::jsonb, '{{data,account}}', to_jsonb(a.code))
                      END,
                      e.created_at
               FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::text[],
                           $6::timestamptz[]) AS e(id, type, account_id, sequence, payload, created_at)
               LEFT JOIN accounts a ON a.id = e.account_id
               ON CONFLICT (id) DO NOTHING
               RETURNING id, type),
         queued AS (
           INSERT INTO webhook_deliveries (event_id, endpoint_id)
           SELECT new.id, w.id FROM new JOIN webhook_endpoints w
             ON w.enabled AND (w.event_types IS NULL OR new.type = ANY(w.event_types))
           RETURNING 1)
         {then}"""


_PUBLISH_NOTIFY = _publish_sql(f"""SELECT count(*) > 0 FROM (
             SELECT pg_notify('{CHANNEL}', '') FROM (SELECT FROM queued LIMIT 1) q) n""")
_PUBLISH_ASK = _publish_sql("SELECT EXISTS (SELECT FROM queued)")


async def publish(conn: Connection, events: list[OutboxEvent], *,
                  notify_at_commit: bool = True) -> bool:
    """Insert events (once each) and a pending delivery for every endpoint that wants them;
    whether it queued any. The dispatchers are notified at the commit when it did, unless
    `notify_at_commit` is False: then the caller notifies after its commit."""
    if not events:
        return False
    queued = await conn.fetchval(
        _PUBLISH_NOTIFY if notify_at_commit else _PUBLISH_ASK,
        [e.id for e in events], [e.type for e in events], [e.account_id for e in events],
        [e.sequence for e in events], [e.payload() for e in events],
        [e.created_at for e in events])
    return bool(queued)
