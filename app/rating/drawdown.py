"""Measurements in, real-time drawdown out (DESIGN invariant 8).

One Postgres transaction per batch: the aggregation states the batch touches are locked in a
fixed order, the new measurements are stored (a duplicate uid changes nothing), each one moves
its states, and for every pricing the charge delta `charge(after) - charge(before)` is added,
converted to the account's credit type, to the pricing's cumulative charge for the period.
What is drawn follows `round(cumulative)` both ways: rounding happens once (half up at the
credit type's places) and the remainder is carried, so what was drawn always equals the rounded
total. When it goes up, the difference is a debit: a `rated_debits` row written in that
transaction (with its charge key and period), then sent through the usage path under the
deterministic uid `r<pricing>:<uid>`; a crash in between is repaired by `send_unsent` (worker).
When it goes down (MIN, LATEST or MEAN falling, a volume or stair-step price dropping to a
cheaper band), the difference is a give-back: a `rated_credits` row (uid `c<pricing>:<uid>`)
written in the same transaction, then paid by reversing the period's own earlier debits, newest
first, overage before balances (`app/rating/giveback.py`); what a crash or a debit still in
flight leaves unpaid, the worker (`giveback.settle_unsettled`) pays. A replayed measurement uid
is not new, so it moves nothing and writes neither.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hashlib
import json
import sys
import time
import weakref
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import asyncpg

from app.config.catalog import AccountRef
from app.db import Connection
from app.entitlements.service import TrustedDebit, debit_trusted
from app.errors import Problem, ValidationProblem
from app.http import validate_items
from app.ledger.service import scaled
from app.money import MAX_PLACES, exact_places
from app.rating import giveback
from app.rating import repository as repo
from app.rating.expressions import Node, evaluate, parse
from app.rating.periods import period_of
from app.rating.pricing import AggState, Band, aggregate, charge, convert, quantity, to_minor
from app.rating.schemas import Debit, ItemError, MeasurementIn, MeasurementResult
from app.schemas import is_decimal_text

if TYPE_CHECKING:
    from app.context import AppContext

METER_TTL_S = 10.0
MAX_MEASURE = Decimal("1e18")


@dataclass(frozen=True)
class Meter:
    id: int
    categories: dict[str, str]
    derived: tuple[tuple[str, Node], ...]


@dataclass
class Item:
    index: int
    body: MeasurementIn
    account: AccountRef
    meter: Meter
    values: dict[str, Decimal | str]
    pricings: list[asyncpg.Record] = field(default_factory=list)
    # what this measurement moved, for its answer: (product, minor units: + drawn, - given
    # back, pricing id)
    moved: list[tuple[str, int, int]] = field(default_factory=list)
    # what goes to the usage path, named after this measurement (the last of its group to move
    # the charge): (usage uid, product, amount in minor units, pricing id)
    sends: list[tuple[str, str, int, int]] = field(default_factory=list)
    # give-backs, named the same way: (credit uid, product, amount in minor units, pricing id,
    # period start)
    gives: list[tuple[str, str, int, int, date]] = field(default_factory=list)

    def place(self, pricings: list[asyncpg.Record]) -> None:
        """The pricings that rate it, and nothing moved yet (a group retried after a rollback
        starts afresh)."""
        self.pricings, self.moved, self.sends, self.gives = pricings, [], [], []


_METERS: dict[str, tuple[Meter, float]] = {}


def cached_meter(code: str) -> Meter | None:
    """The meter when cached and fresh (no coroutine); None: ask `meter`."""
    hit = _METERS.get(code)
    return hit[0] if hit and hit[1] > time.monotonic() else None


async def meter(ctx: AppContext, code: str) -> Meter | None:
    cached = cached_meter(code)
    if cached is not None:
        return cached
    row = await repo.meter_by_code(ctx.pool, code)
    if row is None:
        return None
    categories = {f["code"]: f["category"] for f in json.loads(row["data_fields"])}
    derived = tuple((f["code"], parse(f["expression"])) for f in json.loads(row["derived_fields"]))
    found = Meter(row["id"], categories, derived)
    _METERS[code] = (found, time.monotonic() + METER_TTL_S)
    return found


def _number(value: Any, where: str) -> Decimal:
    """A measure: a JSON number, or a string holding one (exact either way)."""
    try:
        numeric = isinstance(value, int | Decimal) and not isinstance(value, bool)
        text = isinstance(value, str) and len(value) <= 60 and is_decimal_text(value)
        number = Decimal(value) if numeric or text else None
        if number is not None and not (number.is_finite() and abs(number) < MAX_MEASURE
                                       and exact_places(number) <= MAX_PLACES):
            number = None
    except ArithmeticError:  # (abs of 1e999999999 overflows the context)
        number = None
    if number is None:
        raise ValidationProblem(f"must be a number below 1e18 with at most {MAX_PLACES} "
                                f"decimal places", field=where)
    return number if number else Decimal(0)


def field_values(found: Meter, data: dict[str, Any]) -> dict[str, Decimal | str]:
    """Validated data fields plus the derived ones (absent where a division is by zero)."""
    values: dict[str, Decimal | str] = {}
    for name, value in data.items():
        where = f"data.{name}"
        category = found.categories.get(name)
        if category is None:
            raise ValidationProblem("not a data field of this meter", field=where)
        if category == "measure":
            values[name] = _number(value, where)
        else:
            if not isinstance(value, str) or len(value) > 200 or "\x00" in value:
                raise ValidationProblem("must be a string of at most 200 characters",
                                        field=where)
            values[name] = value
    for name, category in found.categories.items():
        if category == "measure" and name not in values:
            raise ValidationProblem("this measure field is missing", field=f"data.{name}")
    numbers = {k: v for k, v in values.items() if isinstance(v, Decimal)}
    for name, node in found.derived:
        result = evaluate(node, numbers)
        if result is not None:
            values[name] = numbers[name] = result
    return values


async def _item(ctx: AppContext, index: int, body: MeasurementIn | Problem,
                now: datetime) -> Item:
    if isinstance(body, Problem):
        raise body
    catalog = ctx.catalog
    account = catalog.cached_account(body.account) or await catalog.account(body.account)
    if account is None:
        raise ValidationProblem(f"unknown account {body.account!r}", field="account")
    found = cached_meter(body.meter) or await meter(ctx, body.meter)
    if found is None:
        raise ValidationProblem(f"unknown meter {body.meter!r}", field="meter")
    if body.timestamp > now + timedelta(seconds=ctx.settings.usage_future_skew_s):
        raise ValidationProblem("is in the future", field="timestamp")
    return Item(index, body, account, found, field_values(found, body.data))


def _rejected(raw: Any, problem: Problem, prefix: str) -> MeasurementResult:
    uid = raw.get("uid") if isinstance(raw, dict) else None
    return MeasurementResult(uid=uid if isinstance(uid, str) else None, status="rejected",
                             error=ItemError(code=problem.code,
                                             field=prefix + (problem.field or "body"),
                                             message=problem.detail))


async def record_measurements(ctx: AppContext, items: list[Any],
                              prefix: str) -> list[MeasurementResult]:
    """Store and rate a batch; each measurement is answered on its own."""
    now = datetime.now(UTC)
    results: dict[int, MeasurementResult] = {}
    valid: list[Item] = []
    seen: set[tuple[int, str]] = set()
    for index, (raw, body) in enumerate(zip(items, validate_items(MeasurementIn, items), strict=True)):
        try:
            item = await _item(ctx, index, body, now)
        except ValidationProblem as problem:
            results[index] = _rejected(raw, problem, prefix.format(index))
            continue
        key = (item.account.id, item.body.uid)
        if key in seen:
            results[index] = MeasurementResult(uid=item.body.uid, status="duplicate")
            continue
        seen.add(key)
        valid.append(item)
    refused: dict[int, ValidationProblem] = {}
    new = await _rate_apart(ctx, valid, refused) if valid else set()
    if refused:
        for item in valid:
            if item.index in refused:
                results[item.index] = _rejected(item.body.model_dump(), refused[item.index],
                                                prefix.format(item.index))
        valid = [item for item in valid if item.index not in refused]
    if valid:
        await send_rated(ctx, valid)
        for item in valid:
            credit_type = item.account.credit_type
            debits: list[Debit] = []
            credits: list[Debit] = []
            if credit_type is not None:  # (built here, outside the group's lock)
                places = -credit_type.decimal_places
                for product, minor, pricing_id in item.moved:
                    (debits if minor > 0 else credits).append(Debit(
                        pricing=f"p{pricing_id}", product=product, credit_type=credit_type.code,
                        amount=f"{Decimal(abs(minor)).scaleb(places):f}"))
            results[item.index] = MeasurementResult(
                uid=item.body.uid, debits=debits, credits=credits,
                status="duplicate" if (item.account.id, item.body.uid) not in new
                else "rated" if item.pricings else "unrated")
    return [results[i] for i in range(len(items))]


async def _rate_apart(ctx: AppContext, items: list[Item],
                      refused: dict[int, ValidationProblem]) -> set[tuple[int, str]]:
    """Rate `items`; when rating refuses them together (an account with no credit type to
    draw, no conversion rate for a day: the transaction rolled back, nothing stored), rate them
    apart, each account's on their own (side by side: the group runs them in one transaction
    and splits it again if one still fails), then one by one, so that only the measurements
    refused are: `refused` gets each one's problem, by its index in the request."""
    try:
        return await _group_of(ctx).rate(items, {(i.account.id, i.body.uid) for i in items})
    except ValidationProblem as problem:
        if len(items) == 1:
            refused[items[0].index] = problem
            return set()
    by_account: dict[int, list[Item]] = {}
    for item in items:
        by_account.setdefault(item.account.id, []).append(item)
    parts = list(by_account.values()) if len(by_account) > 1 else [[item] for item in items]
    new: set[tuple[int, str]] = set()
    for found in await asyncio.gather(*(_rate_apart(ctx, part, refused) for part in parts)):
        new |= found
    return new


def debit_uid(uid: str, pricing_id: int, prefix: str = "r") -> str:
    usage_uid = f"{prefix}{pricing_id}:{uid}"
    if len(usage_uid) <= 128:
        return usage_uid
    return f"{prefix}{pricing_id}:h:{hashlib.sha256(uid.encode()).hexdigest()}"


def credit_uid(uid: str, pricing_id: int) -> str:
    """The give-back a measurement caused for a pricing: `c<pricing id>:<uid>`."""
    return debit_uid(uid, pricing_id, "c")


@dataclass(slots=True)
class Rated:
    """Where one measurement lands for one pricing."""

    item: Item
    pricing: asyncpg.Record
    state_key: repo.StateKey
    value: Decimal | str | None


@functools.lru_cache(maxsize=4096)
def _period_start(anchor: date, frequency: str, interval: int, day: date) -> date:
    return period_of(anchor, frequency, interval, day)[0]


def _placement(item: Item, pricing: asyncpg.Record) -> Rated:
    start = _period_start(pricing["anchor"], pricing["bill_frequency"], pricing["bill_interval"],
                          item.body.timestamp.date())
    segment_field = pricing["segment_field"]
    segment = str(item.values.get(segment_field, "")) if segment_field else ""
    return Rated(item, pricing, (item.account.id, pricing["id"], start, segment),
                 item.values.get(pricing["target_field"]))


def _state(row: asyncpg.Record) -> AggState:
    def dec(name: str) -> Decimal | None:
        return None if row[name] is None else Decimal(row[name])
    return AggState(row["count"], Decimal(row["total"]), dec("low"), dec("high"), dec("latest"),
                    row["latest_key"], row["uniques"])


@functools.lru_cache(maxsize=1024)
def _bands(text: str) -> tuple[Band, ...]:
    """Parsed bands, by their stored JSON text (so a cached entry can never be stale)."""
    return tuple(Band(None if b["up_to"] is None else Decimal(b["up_to"]), Decimal(b["price"]))
                 for b in json.loads(text))


def charge_of(pricing: asyncpg.Record, state: AggState) -> Decimal:
    """A pricing's charge for one state: the fixed fee once it has usage, plus the price."""
    bands = _bands(pricing["bands"])
    units = quantity(aggregate(pricing["function"], state), Decimal(pricing["quantity_per_unit"]),
                     pricing["rounding"])
    return charge(pricing["pricing_type"], bands, Decimal(pricing["fixed_fee"]), units,
                  state.count > 0)


async def _factor(conn: Connection, pricing: asyncpg.Record, item: Item,
                  cache: dict[tuple[int, int, date], tuple[Decimal, bool]]) -> tuple[Decimal, bool]:
    """(rate, multiply) from the plan's currency to the account's credit type on the day."""
    credit_type = item.account.credit_type
    if credit_type is None:
        raise ValidationProblem(f"account {item.account.code!r} has no credit type to draw down",
                                field="account")
    key = (pricing["currency_id"], credit_type.id, item.body.timestamp.date())
    if key not in cache:
        cache[key] = await repo.factor_on(conn, key[0], credit_type, key[2], item.account.code)
    return cache[key]


# a request waiting for a group: its items, their (account id, uid), its answer
Waiting = tuple[list["Item"], set[tuple[int, str]], asyncio.Future[set[tuple[int, str]]]]


class _Group:
    """Group commit for measurements: the batches of concurrent requests (up to GROUP_ITEMS
    measurements) are rated in one transaction by a runner task (GROUP_RUNNERS of them), like
    the journal does for usage. A request is answered only after its group committed; a
    request whose uids another request of the group also carries waits for the next group (a
    uid is rated once)."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.queue: list[Waiting] = []
        self.runners: set[asyncio.Task[None]] = set()

    async def rate(self, items: list[Item], keys: set[tuple[int, str]]) -> set[tuple[int, str]]:
        """Rate `items` in the next group; `keys` are their (account id, uid)."""
        future: asyncio.Future[set[tuple[int, str]]] = asyncio.get_running_loop().create_future()
        self.queue.append((items, keys, future))
        if len(self.runners) < GROUP_RUNNERS:
            runner = asyncio.create_task(self._run())
            self.runners.add(runner)
            runner.add_done_callback(self.runners.discard)
        return await asyncio.shield(future)

    async def _run(self) -> None:
        while self.queue:
            # one connection for the groups run back to back (no acquire and reset per group);
            # a fresh one after a store error
            try:
                async with self.ctx.pool.acquire() as conn:
                    _RUNNER_CONN.set(conn)  # (this runner task's context only)
                    try:
                        while self.queue:
                            if not await self._commit(self._next_group()):
                                break
                    finally:
                        _RUNNER_CONN.set(None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # no connection to be had: what waits gets the error
                waiting, self.queue = self.queue, []
                for _, _, future in waiting:
                    if not future.done():
                        future.set_exception(exc)

    def _next_group(self) -> list[Waiting]:
        group: list[Waiting] = []
        keys: set[tuple[int, str]] = set()
        size, later = 0, []
        for waiting in self.queue:
            items, mine, _ = waiting
            if group and (size + len(items) > GROUP_ITEMS or not mine.isdisjoint(keys)):
                later.append(waiting)
                continue
            group.append(waiting)
            keys |= mine
            size += len(items)
        self.queue = later
        return group

    async def _commit(self, group: list[Waiting]) -> bool:
        """Rate a group and answer its requests; False after a store error (the runner then
        takes another connection)."""
        try:
            new = await _rate(self.ctx, [i for items, _, _ in group for i in items])
        except ValidationProblem:
            if len(group) == 1:
                raise_in(group[0][2])
                return True
            healthy = True
            for one in group:  # one request's bad input must not fail the others: alone
                healthy = await self._commit([one]) and healthy
            return healthy
        except asyncio.CancelledError:  # shutdown: the waiting requests are cancelled too
            for _, _, future in group:
                future.cancel()
            raise
        except Exception as exc:  # a store error: every request of the group gets it
            for _, _, future in group:
                if not future.done():
                    future.set_exception(exc)
            return False
        for _, _, future in group:
            if not future.done():
                future.set_result(new)
        return True


def raise_in(future: asyncio.Future[Any]) -> None:
    """Hand the exception being handled to a waiting request."""
    exc = sys.exc_info()[1]
    if not future.done() and exc is not None:
        future.set_exception(exc)


GROUP_ITEMS = 1000
_RUNNER_CONN: contextvars.ContextVar[Connection | None] = contextvars.ContextVar(
    "rating_runner_connection", default=None)
GROUP_RUNNERS = 2  # transactions in flight per process: one's commit overlaps the next's work
_GROUPS: dict[int, tuple[weakref.ref[AppContext], _Group]] = {}


def _group_of(ctx: AppContext) -> _Group:
    hit = _GROUPS.get(id(ctx))
    if hit is not None and hit[0]() is ctx:
        return hit[1]
    for key in [k for k, (ref, _) in _GROUPS.items() if ref() is None]:
        del _GROUPS[key]
    group = _Group(ctx)
    _GROUPS[id(ctx)] = (weakref.ref(ctx), group)
    return group


async def _rate(ctx: AppContext, items: list[Item]) -> set[tuple[int, str]]:
    """Store the measurements and move the states; returns the (account, uid) that were new.
    In a group runner, on the runner's connection; elsewhere on one of the pool's."""
    conn = _RUNNER_CONN.get()
    if conn is None:
        async with ctx.pool.acquire() as own:
            token = _RUNNER_CONN.set(own)
            try:
                return await _rate(ctx, items)
            finally:
                _RUNNER_CONN.reset(token)
    now = datetime.now(UTC)
    async with conn.transaction():
        found, version = await repo.active_pricings_many(
            conn, list({(i.account.id, i.meter.id, i.body.timestamp.date()) for i in items}))
        for item in items:
            item.place(found.get((item.account.id, item.meter.id, item.body.timestamp.date()),
                                 []))
        placements = [_placement(item, p) for item in items for p in item.pricings]
        # each stored with the version its pricings were read at: a pricing or plan visible
        # only from a later one did not rate it (re-rating places it there later)
        measurements = [(i.account.id, i.body.uid, i.meter.id, i.body.timestamp,
                         _plain(i.body.data), bool(i.pricings), version) for i in items]
        if not placements:
            return await repo.insert_measurements(conn, measurements)
        states, charges, new = await _lock(conn, placements, measurements)
        placements = [r for r in placements if (r.item.account.id, r.item.body.uid) in new]
        if placements:
            await _move(conn, placements, states, charges, now)
    return new


async def _lock(conn: Connection, placements: list[Rated], measurements: list[tuple[Any, ...]]
                ) -> tuple[dict[repo.StateKey, asyncpg.Record], dict[repo.ChargeKey, asyncpg.Record],
                           set[tuple[int, str]]]:
    """Store the measurements, then create-and-lock the states and running charges the
    placements touch (`repo.lock_and_insert`: one fixed order, so no deadlock)."""
    charge_keys = {(r.item.account.id, f"p{r.pricing['id']}", r.state_key[2],
                    r.item.account.credit_type.id if r.item.account.credit_type else 0)
                   for r in placements}
    state_rows, charge_rows, new = await repo.lock_and_insert(
        conn, list({r.state_key for r in placements}), list(charge_keys), measurements)
    states = {(r["account_id"], r["pricing_id"], r["period_start"], r["key"]): r
              for r in state_rows}
    charges = {(r["account_id"], r["key"], r["period_start"]): r for r in charge_rows}
    return states, charges, new


async def rate_stored(conn: Connection, items: list[tuple[Item, int]]) -> tuple[list[Item], int]:
    """Rate stored measurements for the pricings their rating did not see, in the caller's
    transaction (which holds their rows). Each item comes with the rating_config_version it
    was rated at; it is placed in the pricings that now cover its day and became visible
    after that version (none of a billed period: the pricing query skips those), and moves
    the states exactly as a new one would. Returns the items placed somewhere, and the version
    the pricings were read at (every pricing visible at it has now rated each item, or found
    its period billed, which is final); sending their debits and give-backs is the caller's,
    after the commit."""
    found, version = await repo.active_pricings_many(
        conn, list({(i.account.id, i.meter.id, i.body.timestamp.date()) for i, _ in items}))
    for item, rated_at in items:
        day = item.body.timestamp.date()
        item.place([p for p in found.get((item.account.id, item.meter.id, day), [])
                    if p["visible_from"] > rated_at])
    placed = [item for item, _ in items if item.pricings]
    placements = [_placement(item, p) for item in placed for p in item.pricings]
    if placements:
        states, charges, _ = await _lock(conn, placements, [])
        await _move(conn, placements, states, charges, datetime.now(UTC))
    return placed, version


async def _move(conn: Connection, placements: list[Rated],
                states: dict[repo.StateKey, asyncpg.Record],
                charges: dict[repo.ChargeKey, asyncpg.Record], now: datetime) -> None:
    """Move the locked states by the placements, add each charge delta to its pricing's running
    charge, and write back states, charges, debits and give-backs (one statement). The running
    charge is drawn to `round(exact)` both ways: a debit when it goes up, a give-back when it
    goes down.

    Each measurement's own share is kept for its answer (`Item.moved`), but what the group
    moved a running charge by goes out as one debit (or one give-back) per charge: the net of
    the shares, named after the last measurement that moved it (a measurement is new in
    exactly one group, so the name is used once). The drawn total is the same; a batch of
    1,000 measurements over 100 accounts writes 100 debits, not 1,000."""
    unique_rows = [(*r.state_key, _unique_text(r.value)) for r in placements
                   if r.pricing["function"] == "UNIQUE" and r.value is not None]
    fresh = await repo.new_uniques(conn, unique_rows)
    agg = {key: _state(row) for key, row in states.items()}
    exact = {key: Decimal(row["exact"]) for key, row in charges.items()}
    drawn = {key: int(row["drawn_minor"]) for key, row in charges.items()}
    factors: dict[tuple[int, int, date], tuple[Decimal, bool]] = {}
    debits, credits = [], []
    charged: dict[repo.StateKey, Decimal] = {}  # each state's charge after its last move
    opened = dict(drawn)  # each charge as the group found it
    last: dict[repo.ChargeKey, Rated] = {}  # the last placement that moved each charge
    for r in placements:
        if r.value is None:  # the target field is absent (a division by zero)
            continue
        state = agg[r.state_key]
        before = charged.get(r.state_key)
        if before is None:
            before = charge_of(r.pricing, state)
        is_new = False
        if fresh and r.pricing["function"] == "UNIQUE":
            unique = (*r.state_key, _unique_text(r.value))
            is_new = unique in fresh
            fresh.discard(unique)
        ts_key = f"{int(r.item.body.timestamp.timestamp() * 1000):015d}:{r.item.body.uid}"
        state.add(r.value if isinstance(r.value, Decimal) else Decimal(0), ts_key, is_new)
        after = charged[r.state_key] = charge_of(r.pricing, state)
        delta = after - before
        ck = (r.item.account.id, f"p{r.pricing['id']}", r.state_key[2])
        credit_type = r.item.account.credit_type
        known = factors.get((r.pricing["currency_id"], credit_type.id,
                             r.item.body.timestamp.date())) if credit_type else None
        rate, multiply = known or await _factor(conn, r.pricing, r.item, factors)
        exact[ck] += convert(delta, rate, multiply)
        assert credit_type is not None
        # never below nothing: a running charge made negative by rates that changed mid-period
        target = max(0, to_minor(exact[ck], credit_type.decimal_places))
        if target == drawn[ck]:
            continue
        r.item.moved.append((r.pricing["product"], target - drawn[ck], r.pricing["id"]))
        drawn[ck] = target
        last[ck] = r
    for ck, r in last.items():
        minor = drawn[ck] - opened[ck]
        if minor == 0:
            continue
        credit_type = r.item.account.credit_type
        assert credit_type is not None
        amount = Decimal(abs(minor)).scaleb(-credit_type.decimal_places)
        product = r.pricing["product"]
        if minor > 0:
            uid = debit_uid(r.item.body.uid, r.pricing["id"])
            r.item.sends.append((uid, product, minor, r.pricing["id"]))
            debits.append((ck[0], uid, product, credit_type.code, amount, now, ck[1], ck[2]))
        else:
            uid = credit_uid(r.item.body.uid, r.pricing["id"])
            r.item.gives.append((uid, product, -minor, r.pricing["id"], ck[2]))
            credits.append((ck[0], uid, ck[1], ck[2], product, credit_type.code, amount, now))
    await repo.save_rating(
        conn, [(*k, s.count, s.total, s.low, s.high, s.latest, s.latest_key, s.uniques)
               for k, s in agg.items()],
        [(*k, exact[k], drawn[k]) for k in exact], debits, credits)


def _unique_text(value: Decimal | str | None) -> str:
    return f"{value.normalize():f}" if isinstance(value, Decimal) else str(value)


_quote = json.encoder.encode_basestring_ascii  # what json.dumps uses for every str


def _plain(data: dict[str, Any]) -> str:
    """json.dumps({field: value as text}), the same text written without the encoder's
    machinery: the keys and values are all strings."""
    return "{" + ", ".join(
        f"{_quote(k)}: {_quote(v if isinstance(v, str) else f'{Decimal(v):f}')}"
        for k, v in data.items()) + "}"


async def _send(ctx: AppContext, items: list[Item]) -> None:
    """Debit through the usage path (drawdown order, overage, durability, idempotency by uid).

    The debits were computed here from validated configuration (the account's own credit type,
    the pricing's product, an amount in minor units), so they go in as trusted debits: no
    pydantic or catalog work per debit. One the usage path could not take (too large for the
    hot state) stays in rated_debits as before; it is never retried by `send_unsent` either
    (`resend` skips it the same way)."""
    await debit_trusted(ctx, [(uid, item.account, item.account.credit_type, product, minor)
                              for item in items if item.account.credit_type is not None
                              for uid, product, minor, _ in item.sends], answer=False)


async def send_rated(ctx: AppContext, items: list[Item]) -> None:
    """After the commit: the debits, then the give-backs, of rated measurements."""
    await _send(ctx, items)
    await give_back(ctx, items)


async def give_back(ctx: AppContext, items: list[Item]) -> None:
    """Pay the give-backs a committed group wrote (see app/rating/giveback.py)."""
    charges = {(item.account.id, f"p{pricing_id}", period)
               for item in items for _, _, _, pricing_id, period in item.gives}
    if charges:
        await giveback.settle(ctx, sorted(charges))


UNSENT_CURSOR = "rated_debits.unsent"


@dataclass
class UnsentCursor:
    """Where a worker's scan for unsent rated debits goes on from: every pass used to read
    every rated debit of the last 7 days (an anti-join with usage_events per row). A `shared`
    cursor (the workers') is also kept in Postgres (migration 017): a process's first pass goes
    on from the furthest position any process stored, not from 7 days back."""

    after: repo.UnsentKey | None = None
    shared: bool = False


async def send_unsent(ctx: AppContext, older_than_s: float = 5.0,  # float-ok: seconds
                      limit: int = 500, cursor: UnsentCursor | None = None) -> int:
    """Worker: send the rated debits a crash kept from reaching the usage path. With a cursor,
    only those after where its last pass stopped: a full page goes on after its last row, a
    short one after the instant before which every rated debit is committed (a transaction
    still running, whose rows take its start as created_at, holds that instant back). A
    shared cursor stores where it got to once the page is sent."""
    if cursor is not None and cursor.shared and cursor.after is None:  # its first pass
        cursor.after = await repo.stored_cursor(ctx.pool, UNSENT_CURSOR)
    rows, upper = await repo.unsent_debits(ctx.pool, older_than_s, limit,
                                           cursor.after if cursor else None)
    await resend(ctx, rows)
    if cursor is not None:
        before = cursor.after
        if len(rows) == limit:
            last = rows[-1]
            cursor.after = (last["created_at"], last["account_id"], last["uid"])
        elif cursor.after is None or upper > cursor.after[0]:
            cursor.after = (upper, 0, "")
        if cursor.shared and cursor.after is not None and cursor.after != before:
            await repo.store_cursor(ctx.pool, UNSENT_CURSOR, cursor.after)
    return len(rows)


async def resend(ctx: AppContext, rows: list[asyncpg.Record]) -> None:
    """Send `rated_debits` rows (account, uid, product_code, credit_type, amount) through the
    usage path again under their own uids, and wait for their commit: the usage path takes a
    uid once (one it has seen waits for its first use's commit). They go in as trusted
    debits: their uids have the shape the public usage API reserves for rating."""
    debits: list[TrustedDebit] = []
    for row in rows:
        account = await ctx.catalog.account(row["account"])
        credit_type = await ctx.catalog.credit_type(row["credit_type"])
        if account is not None and credit_type is not None:
            debits.append((row["uid"], account, credit_type, row["product_code"],
                           scaled(Decimal(row["amount"]), credit_type)))
    await debit_trusted(ctx, debits)
