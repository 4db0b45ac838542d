"""The bill run: one final bill per account plan and closed billing period.

Real-time drawdown (invariant 8) draws each charge as usage arrives; the bill run closes a
period for good, some days after it ends (`CREDITGATE_BILL_GRACE_D`, default 1: late
measurements rate until then). For each (account plan, period) not billed yet, in one
transaction under the account's row lock:

1. **Hold rating.** After the account lock (the order attaching a plan takes them in), it
   moves `rating_config_version`. Rating transactions share-lock that row while they read
   their pricings, so the move waits for the ones under way (their states are then committed
   and read below), and the ones after it re-read their pricings and find the bill: a
   measurement for a billed period is stored unrated, never drawn without being billed.
2. **Settle the recurring charges** of the period as the sweep does (the standing charge and
   the counters at their final levels), in case a sweep never saw it.
3. **Lines**: the standing charge and each pricing's quantity, bands and amount, exactly as
   bill-to-date computes them from the stored states and counter levels; the subtotal; a
   **minimum spend** top-up when the subtotal is below the plan's minimum; the total rounded
   once, half up, at the plan currency's places. A period the account plan starts or ends
   within is charged for the days it covers (`periods.covered`, `pricing.prorate`).
4. **Settle the credits** (accounts with a credit type): the top-up is a running charge of its
   own (`m<account plan id>`, converted at the rate of the period's last day); then every
   charge of the period is brought to its rounded exact amount: a counter lowered mid-period
   was drawn at its high-water mark, so the difference is given back (reversing the charge's
   own debits, as a real-time give-back does); what was drawn short is debited. Uids
   `b<account plan id>:<period start>:<charge key>`, so nothing is drawn twice.
5. **Write the bill** (unique per account plan and period end) and a `bill.finalized` event.

After the commit the debits go through the usage path and the give-backs are paid; a crash in
between is repaired by the worker passes that already repair real-time rating
(`send_unsent`, `settle_unsettled`). Any number of processes may run it at once: the account
lock serialises them and a billed period is skipped.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import asyncpg

from app.config.catalog import AccountRef, CreditTypeRef
from app.db import Conn, Connection
from app.errors import STORE_ERRORS, NotFound, ValidationProblem
from app.money import fmt
from app.rating import charges, giveback, recurring
from app.rating import recurring_repository as rrepo
from app.rating import repository as repo
from app.rating.billing import pricing_usage
from app.rating.periods import covered, period_of
from app.rating.pricing import CHARGE_ROUNDING, convert, prorate, to_minor
from app.rating.recurring import Draw, Period
from app.rating.schemas import BillOut, BillRunIn, BillRunOut, NotBilled, PricingUsage
from app.webhooks.outbox import OutboxEvent, event_id, publish

if TYPE_CHECKING:
    from app.context import AppContext

log = logging.getLogger(__name__)
PASS_LIMIT = 500  # bills one pass writes at most; the next pass goes on
SEND_EVERY = 100  # accounts whose bills' debits are sent together

_PLANS = f"""
    SELECT x.*, (SELECT max(b.period_end) FROM bills b
                 WHERE b.account_plan_id = x.id) AS billed_through
    FROM ({rrepo.ACCOUNT_PLAN}) x
    WHERE x.start_date < $1 AND ($2::int8[] IS NULL OR x.account_id = ANY($2::int8[]))
    ORDER BY x.account_id, x.id"""

_BILL = f"""
    SELECT b.*, a.code AS account, pl.code AS plan, cur.code AS currency,
           cur.decimal_places AS currency_places, ct.code AS credit_type,
           ct.decimal_places AS credit_places, ap.start_date AS plan_start,
           ap.end_date AS plan_end, split.covered, split.overage,
           (SELECT {repo.CHARGE_LINES} FROM account_charges c WHERE c.bill_id = b.id)
           AS charge_lines
    FROM bills b JOIN accounts a ON a.id = b.account_id
    JOIN account_plans ap ON ap.id = b.account_plan_id JOIN plans pl ON pl.id = ap.plan_id
    JOIN credit_types cur ON cur.id = b.currency_id
    LEFT JOIN credit_types ct ON ct.id = b.credit_type_id
    LEFT JOIN LATERAL {repo.split_sql("b.account_id", "b.period_start", "ap.plan_id",
                                      "ap.id")} split ON true"""


def closed_periods(plan: asyncpg.Record, through: date) -> Iterator[Period]:
    """The periods of an account plan not billed yet that ended by `through` (their exclusive
    end at most `through`), none starting after the plan ends."""
    at = max(plan["start_date"], plan["billed_through"] or plan["start_date"])
    while plan["end_date"] is None or at < plan["end_date"]:
        period = period_of(plan["billing_anchor"], plan["bill_frequency"], plan["bill_interval"],
                           at)
        if period[1] > through:
            return
        yield period
        at = period[1]


@dataclass
class _Run:
    """What one account's transaction owes once it commits."""

    bills: list[int] = field(default_factory=list)
    draws: list[Draw] = field(default_factory=list)
    givebacks: list[tuple[int, str, date]] = field(default_factory=list)


@dataclass
class Outcome:
    bills: list[int] = field(default_factory=list)  # written by this run
    failed: dict[int, tuple[str, str]] = field(default_factory=dict)  # id: (account, reason)
    limited: bool = False  # stopped at the limit: more is due


async def run(ctx: AppContext, through: date, account_ids: list[int] | None = None,
              limit: int = PASS_LIMIT) -> Outcome:
    """Bill every closed period up to `through` (at most `limit` of them). An account that
    cannot be billed yet (a missing conversion rate) is left for a later run."""
    plans = await ctx.pool.fetch(_PLANS, through, account_ids)
    due: dict[int, list[tuple[asyncpg.Record, Period]]] = defaultdict(list)
    outcome, count = Outcome(), 0
    for plan in plans:
        for period in closed_periods(plan, through):
            if count == limit:
                outcome.limited = True
                break
            due[plan["account_id"]].append((plan, period))
            count += 1
    done = _Run()
    for n, (account_id, items) in enumerate(due.items(), 1):
        account = await ctx.catalog.account(items[0][0]["account"])
        assert account is not None
        try:
            await _bill_account(ctx, account, items, done)
        except ValidationProblem as problem:
            log.warning("bills of account %s not written: %s", account.code, problem.detail)
            outcome.failed[account_id] = (account.code, problem.detail)
        except STORE_ERRORS:
            raise
        except Exception:  # one account's own failure: the others are billed all the same
            log.exception("bills of account %s not written", account.code)
            outcome.failed[account_id] = (account.code, "an internal error (logged); retried "
                                                        "by the next run")
        if n % SEND_EVERY == 0 or n == len(due):
            outcome.bills += await _after_commits(ctx, done)
            done = _Run()
    if outcome.bills:
        try:  # at once, for the bills whose debits all landed (else the workers' next pass)
            while await announce_settled(ctx) == ANNOUNCE_PAGE:
                pass
        except STORE_ERRORS as exc:
            log.warning("bill.settled events left to the workers: %r", exc)
    return outcome


# bills not announced yet whose charges' debits are all in the ledger and whose give-backs are
# all paid: their split is final
_SETTLED_DUE = f"""
    SELECT b.id FROM bills b JOIN account_plans ap ON ap.id = b.account_plan_id
    CROSS JOIN LATERAL (SELECT {repo.charge_keys_sql("ap.plan_id", "ap.id")} AS keys) k
    WHERE b.settled_at IS NULL AND (b.credit_type_id IS NULL OR (
        NOT EXISTS (SELECT 1 FROM rated_debits d
                    WHERE d.account_id = b.account_id AND d.period_start = b.period_start
                      AND d.charge_key = ANY(k.keys)
                      AND NOT EXISTS (SELECT 1 FROM usage_events u
                                      WHERE u.account_id = d.account_id AND u.uid = d.uid))
        AND NOT EXISTS (SELECT 1 FROM rated_credits c
                        WHERE c.account_id = b.account_id AND c.period_start = b.period_start
                          AND c.charge_key = ANY(k.keys) AND c.settled_at IS NULL)))
    ORDER BY b.id LIMIT $1"""
ANNOUNCE_PAGE = 200  # bills a transaction announces


async def announce_settled(ctx: AppContext, limit: int = ANNOUNCE_PAGE) -> int:
    """`bill.settled`, once per bill, when what its charges drew is all in the ledger (the bill
    run's own debits and give-backs land after the bill commits): the bill's final split of
    `drawn` into `covered` and `overage`, with its `charges_total`, for the vendor's invoice.
    A page of bills at a time, marked and announced in one transaction (a bill another
    process marked meanwhile is not marked again). The bill run calls it when it is done, the
    workers on every pass (a crash in between). Returns how many it announced."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        ids = [r["id"] for r in await conn.fetch(
            f"""UPDATE bills SET settled_at = now() WHERE id IN ({_SETTLED_DUE})
                AND settled_at IS NULL RETURNING id""", limit)]
        if not ids:
            return 0
        now, events = datetime.now(UTC), []
        for row in await conn.fetch(_BILL + " WHERE b.id = ANY($1::int8[]) ORDER BY b.id", ids):
            out = bill_out(row)
            events.append(OutboxEvent(event_id("bill.settled", out.id), "bill.settled",
                                      row["account_id"], None, now, {
                "bill": out.id, "plan": out.plan, "period_start": out.period_start.isoformat(),
                "period_end": out.period_end.isoformat(), "currency": out.currency,
                "total": out.total, "charges_total": out.charges_total,
                "credit_type": out.credit_type, "drawn": out.drawn, "covered": out.covered,
                "overage": out.overage}))
        await publish(conn, events)
    return len(ids)


async def _bill_account(ctx: AppContext, account: AccountRef,
                        items: list[tuple[asyncpg.Record, Period]], done: _Run) -> None:
    """One account's due bills in one transaction; what they owe is added to `done` once it
    has committed."""
    mine = _Run()
    async with ctx.pool.acquire() as conn, conn.transaction():
        # the account first, then the version row: the order attaching a plan takes them in
        await rrepo.lock_account(conn, account.id)
        await conn.execute("UPDATE rating_config_version SET version = version + 1")
        for plan, period in items:
            await _bill(conn, account, plan, period, mine)
    done.bills += mine.bills
    done.draws += mine.draws
    done.givebacks += mine.givebacks


async def _after_commits(ctx: AppContext, done: _Run) -> list[int]:
    """Send the committed bills' debits through the usage path (as one batch: a group commit,
    not one per account) and pay their give-backs."""
    if done.draws:
        await recurring.send(ctx, done.draws)
    if done.givebacks:
        await giveback.settle(ctx, done.givebacks)
    return done.bills


async def _bill(conn: Connection, account: AccountRef, plan: asyncpg.Record, period: Period,
                done: _Run) -> None:
    start, end = period
    if await rrepo.billed(conn, plan["id"], end):
        return  # another process billed it meanwhile
    pricings = await repo.pricings_in(conn, plan["plan_id"], start, end)
    credit_type = account.credit_type
    if credit_type is not None:
        settlement = recurring.Settlement(conn, account, credit_type)
        await settlement.period(plan, [p for p in pricings if p["counter_id"] is not None], period)
        done.draws += settlement.draws
    since, until = covered(period, plan["start_date"], plan["end_date"])
    lines: list[PricingUsage] = []
    for pricing in pricings:
        lines += await pricing_usage(conn, account.id, pricing, start, end, since, until)
    standing = prorate(Decimal(plan["standing_charge"]), period, since, until)
    minimum = prorate(Decimal(plan["minimum_spend"]), period, since, until)
    subtotal = standing + sum((Decimal(u.amount) for u in lines), Decimal(0))
    topup = max(Decimal(0), minimum - subtotal)
    total = (subtotal + topup).quantize(Decimal(1).scaleb(-plan["currency_places"]),
                                        rounding=CHARGE_ROUNDING)
    drawn = settled = None
    if credit_type is not None:
        keys = [f"p{p['id']}" for p in pricings]
        keys += [f"s{plan['id']}"] if standing > 0 else []
        keys += [f"m{plan['id']}"] if topup > 0 else []
        drawn, settled = await _settle(conn, account, credit_type, plan, period, keys, topup,
                                       done)
    bill_id, charges_total = await charges.insert_bill(conn, (
        account.id, plan["id"], start, end, plan["currency_id"], standing,
        json.dumps([u.model_dump() for u in lines]), subtotal, minimum, topup, total,
        credit_type.id if credit_type else None, drawn, settled,
        plan["end_date"] is not None and plan["end_date"] <= end))
    done.bills.append(bill_id)
    data: dict[str, Any] = {
        "bill": bill_id, "plan": plan["plan"], "period_start": start.isoformat(),
        "period_end": end.isoformat(), "covered_from": since.isoformat(),
        "covered_until": until.isoformat(),
        "currency": plan["currency"], "total": f"{total:f}",
        "credit_type": credit_type.code if credit_type else None,
        "drawn": None if drawn is None else f"{drawn:f}",
        "charges_total": fmt(charges_total, plan["currency_places"])}
    await publish(conn, [OutboxEvent(event_id("bill", bill_id), "bill.finalized", account.id,
                                     None, datetime.now(UTC), data)])


async def _settle(conn: Connection, account: AccountRef, credit_type: CreditTypeRef,
                  plan: asyncpg.Record, period: Period, keys: list[str], topup: Decimal,
                  done: _Run) -> tuple[Decimal, Decimal]:
    """Bring every charge of the period to its rounded exact amount (the minimum-spend top-up
    first becomes the exact amount of `m<account plan>`), the period's total rounded once:
    what rounding each charge apart adds up to beyond the rounded sum of their exact amounts
    (a minor unit here and there) is put on the largest; (drawn, settled) in credits."""
    start, end = period
    places, now = credit_type.decimal_places, datetime.now(UTC)
    rows = await rrepo.lock_charges(conn, [(account.id, key, start, credit_type.id)
                                           for key in keys])
    found = []  # (row, exact, charged, target)
    for row in rows:
        exact, charged = Decimal(row["exact"]), row["charged"]
        if row["charge_key"].startswith("m"):
            rate, multiply = await repo.factor_on(conn, plan["currency_id"], credit_type,
                                                  end - timedelta(days=1), account.code)
            exact, charged = convert(topup, rate, multiply), topup
        found.append((row, exact, charged, to_minor(exact, places)))
    targets = _rounded_once([target for _, _, _, target in found],
                            to_minor(sum((e for _, e, _, _ in found), Decimal(0)), places))
    charges, debits, credits = [], [], []
    drawn_total = settled = 0
    for (row, exact, charged, _), target in zip(found, targets, strict=True):
        key, drawn = row["charge_key"], int(row["drawn_minor"])
        uid = f"b{plan['id']}:{start.isoformat()}:{key}"
        amount = Decimal(abs(target - drawn)).scaleb(-places)
        if target > drawn:
            done.draws.append(Draw(account, credit_type, key, uid, plan["product"],
                                   target - drawn))
            debits.append((account.id, uid, plan["product"], credit_type.code, amount, now, key,
                           start))
        elif target < drawn:
            credits.append((account.id, uid, key, start, plan["product"], credit_type.code,
                            amount, now))
            done.givebacks.append((account.id, key, start))
        if target != drawn or key.startswith("m"):
            charges.append((account.id, key, start, exact, target, charged,
                            int(row["given_minor"])))
        drawn_total += target
        settled += target - drawn
    await rrepo.save_charges(conn, charges, debits)
    await rrepo.insert_credits(conn, credits)
    return Decimal(drawn_total).scaleb(-places), Decimal(settled).scaleb(-places)


def _rounded_once(targets: list[int], total: int) -> list[int]:
    """Each charge's rounded amount, the difference to `total` (the rounded sum) taken up by
    the largest ones (never below nothing)."""
    out = list(targets)
    rest = total - sum(out)
    for i in sorted(range(len(out)), key=lambda i: -out[i]):
        if rest == 0:
            break
        moved = max(rest, -out[i])
        out[i] += moved
        rest -= moved
    return out


def default_through(ctx: AppContext, day: date | None = None) -> date:
    return (day or recurring.today()) - timedelta(days=ctx.settings.bill_grace_d)


async def run_request(ctx: AppContext, body: BillRunIn) -> BillRunOut:
    """`POST /v1/bills/run`: bill what is due now, or through a given day (at most today)."""
    through = body.through or default_through(ctx)
    if through > recurring.today():
        raise ValidationProblem("a period that has not ended cannot be billed", field="through")
    account_ids = None
    if body.account is not None:
        account = await ctx.catalog.account(body.account)
        if account is None:
            raise NotFound(f"no account {body.account!r}", field="account")
        account_ids = [account.id]
    made: list[int] = []
    while True:
        outcome = await run(ctx, through, account_ids)
        made += outcome.bills
        if not outcome.limited:
            return BillRunOut(through=through, bills=made, not_billed=[
                NotBilled(account=code, reason=reason) for code, reason in outcome.failed.values()])


@dataclass
class BillMemory:
    """What the workers' last bill pass saw: periods end on days, so on the same day a pass
    has only what the last one left to do (the limit, accounts missing a rate)."""

    day: date | None = None
    limited: bool = False
    failed: list[int] = field(default_factory=list)


async def run_when_due(ctx: AppContext, memory: BillMemory, day: date | None = None,
                       account_ids: list[int] | None = None) -> int:
    """Worker: bill what is due when the day changed, else go on after the limit or retry the
    accounts that failed, else nothing (no query). `account_ids`: only those (a test's)."""
    if not ctx.settings.bills_auto:
        return 0
    day = day or recurring.today()
    if memory.day == day and not memory.limited:
        if not memory.failed:
            return 0
        outcome = await run(ctx, default_through(ctx, day), memory.failed)
    else:
        outcome = await run(ctx, default_through(ctx, day), account_ids)
    memory.day, memory.limited, memory.failed = day, outcome.limited, list(outcome.failed)
    return len(outcome.bills)


def bill_out(row: asyncpg.Record) -> BillOut:
    credit_places = row["credit_places"]
    since, until = covered((row["period_start"], row["period_end"]), row["plan_start"],
                           row["plan_end"])
    return BillOut(
        id=row["id"], account=row["account"], account_plan=row["account_plan_id"],
        plan=row["plan"], period_start=row["period_start"],
        period_end=row["period_end"], currency=row["currency"],
        covered_from=since, covered_until=until,
        standing_charge=f"{Decimal(row['standing_charge']):f}",
        pricings=[PricingUsage.model_validate(p) for p in json.loads(row["pricings"])],
        subtotal=f"{Decimal(row['subtotal']):f}",
        minimum_spend=f"{Decimal(row['minimum_spend']):f}",
        minimum_spend_topup=f"{Decimal(row['minimum_topup']):f}",
        total=fmt(Decimal(row["total"]), row["currency_places"]),
        charges=charges.lines(json.loads(row["charge_lines"]), row["currency_places"])[0],
        charges_total=fmt(Decimal(row["charges_total"]), row["currency_places"]),
        credit_type=row["credit_type"],
        drawn=None if row["drawn"] is None else fmt(Decimal(row["drawn"]), credit_places),
        settled=None if row["settled"] is None else fmt(Decimal(row["settled"]), credit_places),
        covered=None if row["credit_type"] is None else fmt(Decimal(row["covered"]),
                                                            credit_places),
        overage=None if row["credit_type"] is None else fmt(Decimal(row["overage"]),
                                                            credit_places),
        created_at=row["created_at"])


async def bill(conn: Conn, bill_id: int) -> BillOut:
    row = await conn.fetchrow(_BILL + " WHERE b.id = $1", bill_id)
    if row is None:
        raise NotFound(f"no bill {bill_id}", field="id")
    return bill_out(row)


async def bills_of(conn: Conn, account_id: int | None, after_id: int, limit: int,
                   period_start: date | None = None) -> list[BillOut]:
    """Bills in the order they were written: of one account or every one, of periods that
    started on `period_start` or all."""
    rows = await conn.fetch(
        _BILL + """ WHERE ($1::int8 IS NULL OR b.account_id = $1) AND b.id > $2
                      AND ($4::date IS NULL OR b.period_start = $4)
                    ORDER BY b.id LIMIT $3""", account_id, after_id, limit, period_start)
    return [bill_out(r) for r in rows]
