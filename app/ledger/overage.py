"""Settling overage: what usage took beyond every balance is owed, and the vendor collects it
its own way (an invoice, a card on file, a transfer). `POST
/v1/accounts/{code}/overage-settlements` records that an amount of it was paid (or let off):
an `overage` ledger entry with a positive amount, keyed `os:<account>:<credit type>:<reference>`,
so one payment reference settles once.

Never more than is owed: the check and the entry are made under a per-(account, credit type)
advisory lock (on a connection of its own), after the account's journal is flushed, so
overage that writes still in the journal took counts and two settlements cannot both take
the last of it. The entry and its `overage.settled` event commit together; then the account's
hot copy is rebuilt from Postgres (its overage reads the new entry).
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING

from app.config.catalog import AccountRef, CreditTypeRef
from app.db import Connection, exclusive
from app.errors import Conflict, ValidationProblem
from app.ledger import repository as repo
from app.ledger.schemas import OverageSettlementIn, OverageSettlementOut
from app.ledger.service import account_ref, resolve_credit_type, scaled
from app.money import fmt, scaled_text, to_scaled
from app.webhooks.outbox import OutboxEvent, event_id, publish

if TYPE_CHECKING:
    from app.context import AppContext

OVERAGE_LOCK = 0x6F776564  # "owed": advisory lock class of an account's overage settlements


async def _owed(conn: Connection, account: AccountRef, credit_type: CreditTypeRef) -> int:
    for row in await repo.overages(conn, [account.id]):
        if row["credit_type"] == credit_type.code:
            return to_scaled(Decimal(row["overage"]), credit_type.decimal_places)
    return 0


async def settle(ctx: AppContext, code: str,
                 body: OverageSettlementIn) -> tuple[OverageSettlementOut, bool]:
    """Record a payment of overage; (the settlement, whether this call made it)."""
    account = await account_ref(ctx, code, field="code")
    credit_type = await resolve_credit_type(ctx, account, body.credit_type, "credit_type")
    amount, places = scaled(body.amount, credit_type), credit_type.decimal_places

    def out(owed_before: int | None, owed_after: int, duplicate: bool) -> OverageSettlementOut:
        return OverageSettlementOut(
            account=code, credit_type=credit_type.code, reference=body.reference,
            amount=fmt(body.amount, places),
            owed_before=None if owed_before is None else scaled_text(owed_before, places),
            owed_after=scaled_text(owed_after, places), duplicate=duplicate)

    op = f"os:{account.id}:{credit_type.id}:{body.reference}"
    async with exclusive(ctx.settings.database_url, OVERAGE_LOCK,
                         f"{account.id}:{credit_type.id}") as conn:
        earlier = await conn.fetchval("SELECT amount FROM ledger_entries WHERE op_key = $1", op)
        if earlier is not None:
            if Decimal(earlier) != body.amount:
                raise Conflict(f"reference {body.reference!r} settled "
                               f"{fmt(Decimal(earlier), places)} already", field="reference")
            return out(None, await _owed(conn, account, credit_type), True), False
        await ctx.journal.recover_root(account.root_id)  # overage still in the journal counts
        owed = await _owed(conn, account, credit_type)
        if amount > owed:
            raise ValidationProblem(f"more than the {scaled_text(owed, places)} "
                                    f"owed in {credit_type.code}", field="amount")
        description = body.description or f"overage settled: {body.reference}"
        await repo.insert_overage_credit(conn, op, account.id, credit_type.id, body.amount,
                                         None, None, description)
        await publish(conn, [OutboxEvent(
            event_id("overage", op), "overage.settled", account.id, None, datetime.now(UTC),
            {"account": code, "credit_type": credit_type.code, "reference": body.reference,
             "amount": fmt(body.amount, places),
             "owed": scaled_text(owed - amount, places)})])
    await ctx.hot.invalidate(account.root_id)  # its overage is rebuilt from Postgres
    return out(owed, owed - amount, False), True
