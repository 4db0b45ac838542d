"""Counters and standing charges drawn down in real time (DESIGN invariant 8).

A counter pricing's charge for a period and a plan's standing charge do not move with
measurements: they follow from what is known now (the account's counter levels, the plan).
So real-time drawdown *settles* them: it recomputes the charge the bill would show for the
whole period if nothing else changed (a prorated counter: each known level over the days it
holds, the rest of the period at the latest level; a peak counter: the highest known level;
the standing charge: the plan's; each for the days before the account plan's end when it
ends within the period, `periods.covered`) and draws the difference from what it already took,
`charge(now) - charge(settled before)`, through the same machinery as measurements: the
cumulative exact charge per (account, charge key, period) in `rated_charges` (`charged`
remembers the plan-currency charge already in it), converted to the account's credit type,
rounded once with the remainder carried, a `rated_debits` row in the same transaction, then
the usage path under a deterministic uid (`send_unsent` repairs a crash in between).

A charge that goes down (a counter lowered) is not given back mid-period: the drawn amount
stays at its high-water mark and the bill run settles the difference (unlike a measurement
charge, which `app/rating/giveback.py` gives back at once). Moving an account plan's end
earlier is the exception: the cut-off days are given back in its transaction (`on_end`).

When it happens, each in one transaction under the account's row lock:
- a counter adjustment settles every started period of the account's plans that price the
  counter, from the period holding its effective date through the current one;
- attaching a plan settles every started period of it (standing charge and counters);
- moving an account plan's end settles its current period again;
- the worker's sweep, and the first rated measurement of an account in a process each day,
  settle the current period of every plan in effect that has not been settled yet (a new
  period: the standing charge, and the counter levels carried over).
Periods that have not started are settled when they start.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import asyncpg

from app.config.catalog import AccountRef, CreditTypeRef
from app.db import Connection
from app.entitlements.service import debit_trusted
from app.errors import STORE_ERRORS, ValidationProblem, one_by_one
from app.rating import giveback
from app.rating import recurring_repository as rrepo
from app.rating import repository as repo
from app.rating.periods import counted, covered, period_of
from app.rating.pricing import Band, convert, counter_charge, counter_levels, prorate, to_minor
from app.rating.schemas import Debit, MeasurementResult

if TYPE_CHECKING:
    from app.context import AppContext

log = logging.getLogger(__name__)

Period = tuple[date, date]
Levels = list[tuple[date, Decimal]]


@dataclass(frozen=True, slots=True)
class Draw:
    """A debit a settlement owes, sent through the usage path once its transaction commits."""

    account: AccountRef
    credit_type: CreditTypeRef
    charge_key: str
    uid: str
    product: str
    minor: int

    def debit(self) -> Debit:
        amount = Decimal(self.minor).scaleb(-self.credit_type.decimal_places)
        return Debit(pricing=self.charge_key, product=self.product,
                     credit_type=self.credit_type.code, amount=f"{amount:f}")


def today() -> date:
    return datetime.now(UTC).date()


def started_periods(plan: asyncpg.Record, first_day: date, day: date) -> Iterator[Period]:
    """The billing periods of an account plan from the one holding `first_day` through the one
    holding `day` (the ones that have started by then), none starting after the plan ends."""
    anchor, end = plan["billing_anchor"], plan["end_date"]
    at = max(first_day, plan["start_date"])
    while at <= day and (end is None or at < end):
        period = period_of(anchor, plan["bill_frequency"], plan["bill_interval"], at)
        yield period
        at = period[1]


def overlaps(pricing: asyncpg.Record, period: Period) -> bool:
    """A counter pricing charges every period its date range touches (for the days of it
    that it counts, `periods.counted`, as bill-to-date does); an empty range (a pricing
    cancelled before it started) touches none."""
    start, end = pricing["start_date"], pricing["end_date"]
    return start < period[1] and (end is None or (start < end and end > period[0]))


def counter_amount(pricing: asyncpg.Record, levels: Levels, period: Period, since: date,
                   until: date) -> Decimal:
    """A counter pricing's charge for a period, in the plan's currency (what bill-to-date says):
    the levels of the days it counts (`periods.counted`: its own, within [since, until))."""
    bands = [Band(None if b["up_to"] is None else Decimal(b["up_to"]), Decimal(b["price"]))
             for b in json.loads(pricing["bands"])]
    days = counted(since, until, pricing["start_date"], pricing["end_date"])
    return counter_charge(pricing["pricing_type"], bands, Decimal(pricing["fixed_fee"]),
                          counter_levels(levels, *days), (period[1] - period[0]).days,
                          pricing["counter_mode"])


def _uid(key: str, start: date, drawn_before: int, drawn_after: int) -> str:
    """The usage uid of a debit: fixed by what it brings the period's debited total to (drawn
    plus what was given back: it only grows), so a retried settlement can never debit twice
    and no uid is used twice. A standing charge's first debit: `s<ap>:<start>`."""
    if key.startswith("s") and drawn_before == 0:
        return f"{key}:{start.isoformat()}"
    prefix = "c" + key[1:] if key.startswith("p") else key
    return f"{prefix}:{start.isoformat()}:{drawn_after}"


class Settlement:
    """One transaction's settlements for one account (levels read once per counter). A charge
    that went down keeps what it drew (the high-water mark: the bill run settles it), unless
    `give_back`: then the difference is given back at once (`givebacks`, paid by
    `giveback.settle` once the transaction has committed)."""

    def __init__(self, conn: Connection, account: AccountRef, credit_type: CreditTypeRef,
                 give_back: bool = False) -> None:
        self.conn, self.account, self.credit_type = conn, account, credit_type
        self.give_back = give_back
        self.levels: dict[int, Levels] = {}
        self.draws: list[Draw] = []
        self.givebacks: list[tuple[int, str, date]] = []

    async def _levels(self, counter_id: int) -> Levels:
        if counter_id not in self.levels:
            self.levels[counter_id] = await repo.counter_levels(self.conn, self.account.id,
                                                                counter_id)
        return self.levels[counter_id]

    async def period(self, plan: asyncpg.Record, pricings: list[asyncpg.Record], period: Period,
                     changed: date | None = None) -> None:
        """Draw one period of an account plan up to its standing charge and counter charges
        known now. `changed`: the day a counter level changed (its delta is converted at the
        rate of that day; everything else at the rate of the period's first day)."""
        start = period[0]
        if await rrepo.billed(self.conn, plan["id"], period[1]):
            return  # the bill run settled this period for good
        targets: dict[str, tuple[Decimal, date]] = {}
        since, until = covered(period, plan["start_date"], plan["end_date"])
        standing = Decimal(plan["standing_charge"])
        if standing > 0:
            targets[f"s{plan['id']}"] = (prorate(standing, period, since, until), start)
        for pricing in pricings:
            if overlaps(pricing, period):
                amount = counter_amount(pricing, await self._levels(pricing["counter_id"]), period,
                                        since, until)
                targets[f"p{pricing['id']}"] = (amount, max(start, changed or start))
        if not targets:
            return
        rows = await rrepo.lock_charges(self.conn, [(self.account.id, key, start,
                                                     self.credit_type.id) for key in targets])
        places, now = self.credit_type.decimal_places, datetime.now(UTC)
        charges, debits, credits = [], [], []
        for row in rows:
            key = row["charge_key"]
            target, day = targets[key]
            charged = Decimal(0) if row["charged"] is None else Decimal(row["charged"])
            exact, drawn = Decimal(row["exact"]), int(row["drawn_minor"])
            given = int(row["given_minor"])
            if target != charged:
                rate, multiply = await repo.factor_on(self.conn, plan["currency_id"],
                                                      self.credit_type, day, self.account.code)
                exact += convert(target - charged, rate, multiply)
            rounded = max(0, to_minor(exact, places))
            after = rounded if self.give_back else max(drawn, rounded)
            given_after = given + max(0, drawn - after)
            if row["charged"] is None or target != charged or after != drawn:
                charges.append((self.account.id, key, start, exact, after, target, given_after))
            if after > drawn:
                uid = _uid(key, start, drawn + given, after + given)
                draw = Draw(self.account, self.credit_type, key, uid, plan["product"],
                            after - drawn)
                self.draws.append(draw)
                debits.append((self.account.id, draw.uid, draw.product, self.credit_type.code,
                               Decimal(draw.minor).scaleb(-places), now, key, start))
            elif after < drawn:  # (give_back only) keyed by what was given in all: it only grows
                credits.append((self.account.id, f"e{key}:{start.isoformat()}:{given_after}", key,
                                start, plan["product"], self.credit_type.code,
                                Decimal(drawn - after).scaleb(-places), now))
                self.givebacks.append((self.account.id, key, start))
        await rrepo.save_charges(self.conn, charges, debits)
        await rrepo.insert_credits(self.conn, credits)


async def _pricings_by_plan(conn: Connection | asyncpg.Pool,
                            plan_ids: Iterable[int]) -> dict[int, list[asyncpg.Record]]:
    found: dict[int, list[asyncpg.Record]] = defaultdict(list)
    for row in await rrepo.counter_pricings(conn, sorted(set(plan_ids))):
        found[row["plan_id"]].append(row)
    return found


async def on_attach(conn: Connection, account: AccountRef, account_plan_id: int,
                    day: date | None = None) -> list[Draw]:
    """In the attaching transaction: settle every started period of the new account plan."""
    if account.credit_type is None:
        return []  # nothing to draw against: the bill run charges it
    plan = await rrepo.account_plan(conn, account_plan_id)
    assert plan is not None
    pricings = (await _pricings_by_plan(conn, [plan["plan_id"]]))[plan["plan_id"]]
    settlement = Settlement(conn, account, account.credit_type)
    for period in started_periods(plan, plan["start_date"], day or today()):
        await settlement.period(plan, pricings, period)
    return settlement.draws


async def on_end(conn: Connection, account: AccountRef, account_plan_id: int,
                 day: date | None = None) -> Settlement | None:
    """In the transaction that moves an account plan's end (after it is written): settle the
    current period again, whose cover the end may have cut short or lengthened (an end is
    never before tomorrow, so no other started period changes): the difference is drawn, or
    given back at once. The caller sends the draws and pays the give-backs once committed
    (`after_end`); None: the account has no credit type (nothing was drawn)."""
    if account.credit_type is None:
        return None
    plan = await rrepo.account_plan(conn, account_plan_id)
    assert plan is not None
    pricings = (await _pricings_by_plan(conn, [plan["plan_id"]]))[plan["plan_id"]]
    settlement = Settlement(conn, account, account.credit_type, give_back=True)
    day = day or today()
    for period in started_periods(plan, day, day):
        await settlement.period(plan, pricings, period)
    return settlement


async def after_end(ctx: AppContext, settlement: Settlement | None) -> None:
    """After `on_end`'s transaction committed: the debits, then the give-backs."""
    if settlement is not None:
        await send(ctx, settlement.draws)
        if settlement.givebacks:
            await giveback.settle(ctx, settlement.givebacks)


async def on_adjust(conn: Connection, account: AccountRef, counter_id: int, effective: date,
                    day: date | None = None) -> list[Draw]:
    """In the adjusting transaction (after the level is written): settle every started period
    the new level changes, of every plan of the account that prices the counter."""
    if account.credit_type is None:
        return []
    plans = await rrepo.account_plans_pricing_counter(conn, account.id, counter_id)
    by_plan = await _pricings_by_plan(conn, [p["plan_id"] for p in plans])
    settlement = Settlement(conn, account, account.credit_type)
    for plan in plans:
        pricings = by_plan[plan["plan_id"]]
        mine = [p for p in pricings if p["counter_id"] == counter_id]
        for period in started_periods(plan, effective, day or today()):
            if any(overlaps(p, period) for p in mine):
                await settlement.period(plan, pricings, period, changed=effective)
    return settlement.draws


async def sweep(ctx: AppContext, day: date | None = None,
                account_ids: list[int] | None = None) -> int:
    """Settle the current period of every account plan in effect whose standing charge or
    counter charges that period has not been settled yet. Safe in any number of processes
    (the account's row lock, then the charges' own); returns the debits drawn."""
    drawn, _ = await _sweep(ctx, day or today(), account_ids)
    return drawn


@dataclass
class SweepMemory:
    """What a worker's last sweep saw. Periods start on days, so on the same day, with the
    same configuration (`rating_config_version`), a pass over every account plan finds due
    only what the last one could not settle: that is all the next passes retry."""

    day: date | None = None
    version: int | None = None
    unsettled: list[int] = field(default_factory=list)  # account ids


async def sweep_when_due(ctx: AppContext, memory: SweepMemory, day: date | None = None) -> int:
    """Worker: `sweep` of every account plan when the day or the configuration changed since
    the last pass, else of the accounts the last pass left unsettled, else nothing (one query).
    Every 2 s in every process, a full pass cost in proportion to the account plans."""
    day = day or today()
    version = await rrepo.config_version(ctx.pool)  # read first: a change after it is seen next
    if (day, version) == (memory.day, memory.version):
        if not memory.unsettled:
            return 0
        drawn, due = await _sweep(ctx, day, memory.unsettled)
    else:
        drawn, due = await _sweep(ctx, day, None)
    memory.day, memory.version, memory.unsettled = day, version, due
    return drawn


async def _sweep(ctx: AppContext, day: date, account_ids: list[int] | None
                 ) -> tuple[int, list[int]]:
    """(debits drawn, accounts that were due): the ones a later pass must see again until a
    pass finds them settled."""
    plans = await rrepo.active_account_plans(ctx.pool, day, account_ids)
    if not plans:
        return 0, []
    by_plan = await _pricings_by_plan(ctx.pool, [p["plan_id"] for p in plans])
    expected: dict[tuple[int, str, date], asyncpg.Record] = {}
    for plan in plans:
        period = period_of(plan["billing_anchor"], plan["bill_frequency"], plan["bill_interval"],
                           day)
        keys = [f"s{plan['id']}"] if Decimal(plan["standing_charge"]) > 0 else []
        keys += [f"p{p['id']}" for p in by_plan[plan["plan_id"]] if overlaps(p, period)]
        for key in keys:
            expected[(plan["account_id"], key, period[0])] = plan
    done = await rrepo.settled(ctx.pool, list(expected))
    due: dict[int, dict[int, asyncpg.Record]] = defaultdict(dict)
    for charge, plan in expected.items():
        if charge not in done:
            due[plan["account_id"]][plan["id"]] = plan
    drawn = await one_by_one(list(due.values()), lambda account_plans: _settle_current(
        ctx, list(account_plans.values()), by_plan, day), "recurring charges")
    return drawn, list(due)


async def _settle_current(ctx: AppContext, plans: list[asyncpg.Record],
                          by_plan: dict[int, list[asyncpg.Record]], day: date) -> int:
    account = await ctx.catalog.account(plans[0]["account"])
    if account is None or account.credit_type is None:
        return 0
    try:
        async with ctx.pool.acquire() as conn, conn.transaction():
            await rrepo.lock_account(conn, account.id)
            settlement = Settlement(conn, account, account.credit_type)
            for plan in plans:
                period = period_of(plan["billing_anchor"], plan["bill_frequency"],
                                   plan["bill_interval"], day)
                await settlement.period(plan, by_plan[plan["plan_id"]], period)
    except ValidationProblem as problem:  # e.g. no conversion rate yet: the next pass retries
        log.warning("recurring charges of account %s not drawn: %s", account.code,
                    problem.detail)
        return 0
    await send(ctx, settlement.draws)
    return len(settlement.draws)


async def send(ctx: AppContext, draws: list[Draw]) -> None:
    """Debit through the usage path (drawdown order, overage, durability, idempotency by uid)."""
    await debit_trusted(ctx, [(d.uid, d.account, d.credit_type, d.product, d.minor)
                              for d in draws], answer=False)


_SETTLED_ON: dict[int, date] = {}  # account id -> the day its current periods were last settled
_SETTLED_MAX = 100_000


async def after_measurements(ctx: AppContext, items: list[Any],
                             results: list[MeasurementResult]) -> None:
    """First activity in a period: the first rated measurement of an account (per process and
    day) settles its current periods if the sweep has not yet. Best effort: the measurements
    are already committed, and the sweep does the same."""
    day = today()
    codes = {item["account"] for item, result in zip(items, results, strict=True)
             if result.status == "rated" and isinstance(item, dict)}
    ids = []
    catalog = ctx.catalog
    for code in codes:
        account = catalog.cached_account(code) or await catalog.account(code)
        if account is not None and _SETTLED_ON.get(account.id) != day:
            ids.append(account.id)
    if not ids:
        return
    try:
        await sweep(ctx, day, ids)
    except STORE_ERRORS as exc:
        log.warning("recurring charges not settled after measurements: %s", exc)
        return
    if len(_SETTLED_ON) > _SETTLED_MAX:
        _SETTLED_ON.clear()
    _SETTLED_ON.update(dict.fromkeys(ids, day))
