"""The outbox: events are written in the transaction of the change that caused them, with one
pending delivery per subscribed endpoint. Event ids derive from the causing operation, so a
re-flushed journal record cannot publish an event twice."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from app.db import Connection
from app.money import fmt, from_scaled

if TYPE_CHECKING:
    from app.ledger.journal import JournalRecord

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


def events_for(record: JournalRecord, at: datetime) -> list[OutboxEvent]:
    """The events one committed journal record raises."""
    p = record.payload
    dp = int(p["dp"])

    def amount(scaled: int) -> str:
        return fmt(from_scaled(scaled, dp), dp)

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


async def publish(conn: Connection, events: list[OutboxEvent]) -> None:
    """Insert events (once each) and a pending delivery for every endpoint that wants them."""
    if not events:
        return
    await conn.execute(
        """WITH new AS (
               INSERT INTO webhook_events (id, type, account_id, sequence, payload, created_at)
               SELECT e.id, e.type, e.account_id, e.sequence,
                      CASE WHEN a.code IS NULL THEN e.payload::jsonb
                           ELSE jsonb_set(e.payload::jsonb, '{data,account}', to_jsonb(a.code)) END,
                      e.created_at
               FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::text[],
                           $6::timestamptz[]) AS e(id, type, account_id, sequence, payload, created_at)
               LEFT JOIN accounts a ON a.id = e.account_id
               ON CONFLICT (id) DO NOTHING
               RETURNING id, type)
           INSERT INTO webhook_deliveries (event_id, endpoint_id)
           SELECT new.id, w.id FROM new JOIN webhook_endpoints w
             ON w.enabled AND (w.event_types IS NULL OR new.type = ANY(w.event_types))""",
        [e.id for e in events], [e.type for e in events], [e.account_id for e in events],
        [e.sequence for e in events], [e.payload() for e in events],
        [e.created_at for e in events],
    )
