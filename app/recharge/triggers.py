"""Auto-recharge triggers raised by the hot path: a `recharge` watch crossed by a committed
change becomes one pending `auto_recharges` row, written in the same transaction. The row's
trigger key comes from the crossing operation (a re-flush inserts nothing new) and a partial
unique index keeps at most one recharge in flight per account and credit type."""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING

from app.db import Connection
from app.hotstate.store import RECHARGE_WATCH
from app.money import from_scaled

if TYPE_CHECKING:
    from app.ledger.journal import JournalRecord

Trigger = tuple[str, int, str, Decimal]  # trigger key, account id, credit type code, available


def triggers_for(record: JournalRecord) -> list[Trigger]:
    if not record.crossings:
        return []
    dp = int(record.payload["dp"])
    found = []
    for crossing in filter(None, record.crossings.split(";")):
        name, account, ct, total, _ = crossing.split("|")
        if name == RECHARGE_WATCH:
            found.append((f"x:{record.op_key}:{account}:{ct}", int(account), ct,
                          from_scaled(int(total), dp)))
    return found


async def insert_triggers(conn: Connection, triggers: list[Trigger]) -> None:
    """Start one recharge per crossing, buying what closes the gap to recharge_to; nothing
    when one is already in flight or auto-recharge was disabled meanwhile."""
    if not triggers:
        return
    await conn.execute(
        """INSERT INTO auto_recharges (account_id, credit_type_id, trigger_key, available, credits)
           SELECT t.account_id, c.credit_type_id, t.key, t.available, c.recharge_to - t.available
           FROM unnest($1::text[], $2::int8[], $3::text[], $4::numeric[])
                AS t(key, account_id, credit_type, available)
           JOIN credit_types ct ON ct.code = t.credit_type
           JOIN auto_recharge_configs c
             ON c.account_id = t.account_id AND c.credit_type_id = ct.id AND c.enabled
           ON CONFLICT DO NOTHING""",
        [t[0] for t in triggers], [t[1] for t in triggers], [t[2] for t in triggers],
        [t[3] for t in triggers],
    )
