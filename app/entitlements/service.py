"""check, check-and-consume, usage debits and the real-time balance view."""

from __future__ import annotations

import asyncio
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from app.config.catalog import AccountRef, CreditTypeRef
from app.entitlements.schemas import (
    RESERVED_UID,
    AccountBalancesOut,
    CheckIn,
    CheckOut,
    CreditTypeAvailable,
    EventError,
    LiveBalance,
    UsageEvent,
    UsageResult,
)
from app.errors import Problem, Unavailable, ValidationProblem
from app.hotstate.checkcache import Answer
from app.hotstate.store import DecideArgs, Decision, mark_window_start, pairs
from app.http import validate_items
from app.ledger import repository as ledger_repo
from app.ledger.journal import JournalRecord
from app.ledger.loader import to_ms
from app.ledger.ops import decide, now_ms
from app.ledger.repository import ms_to_dt
from app.ledger.service import account_ref, resolve_credit_type, scaled
from app.money import MAX_SCALED, scaled_text
from app.schemas import UID_PATTERN

if TYPE_CHECKING:
    from app.context import AppContext


@dataclass(slots=True)
class Prepared:
    """A usage event that passed validation, ready for its root's script."""

    index: int
    event: UsageEvent | None  # None: built by trusted code (`debit_trusted`); uid: args.uid
    account: AccountRef
    credit_type: CreditTypeRef
    args: DecideArgs


def _amount(value: int, credit_type: CreditTypeRef) -> str:
    return scaled_text(value, credit_type.decimal_places)


def _usage_payload(account: AccountRef, credit_type: CreditTypeRef, uid: str, product: str,
                   amount: int, at_ms: int, hold_expires_ms: int | None = None) -> str:
    # codes and uids are restricted to [A-Za-z0-9_.:-] (schemas), so no escaping is needed:
    # this is the hot path's JSON, written without json.dumps
    hold = "" if hold_expires_ms is None else f',"hx":{hold_expires_ms}'
    return (f'{{"a":{account.id},"ct":{credit_type.id},"cc":"{credit_type.code}",'
            f'"dp":{credit_type.decimal_places},"uid":"{uid}","prod":"{product}",'
            f'"amt":"{amount}","ts":{at_ms}{hold}}}')


def _usage_fields(account: AccountRef, credit_type: CreditTypeRef, uid: str, product: str,
                  amount: int, at_ms: int, hold_expires_ms: int | None = None) -> dict[str, Any]:
    """The same payload as a dict, for the journal record this process commits itself."""
    fields: dict[str, Any] = {
        "a": account.id, "ct": credit_type.id, "cc": credit_type.code,
        "dp": credit_type.decimal_places, "uid": uid, "prod": product, "amt": str(amount),
        "ts": at_ms}
    if hold_expires_ms is not None:
        fields["hx"] = hold_expires_ms
    return fields


async def check(ctx: AppContext, body: CheckIn, header_key: str | None) -> CheckOut:
    catalog = ctx.catalog
    account = catalog.cached_account(body.account) or await catalog.account(body.account)
    if account is None:
        return CheckOut(allowed=False, reason="unknown_account", available=None, credit_type=None)
    if not catalog.known_product(body.product) and not await catalog.product_exists(body.product):
        return CheckOut(allowed=False, reason="unknown_product", available=None, credit_type=None)
    key = body.idempotency_key or _header_key(header_key)
    if body.consume and (body.amount is None or key is None):
        field = "amount" if body.amount is None else "idempotency_key"
        raise ValidationProblem("consume needs an amount and an idempotency key", field=field)
    if body.credit_type is None and account.credit_type is None:
        return CheckOut(allowed=False, reason="no_eligible_balance", available="0", credit_type=None)
    credit_type = account.credit_type if body.credit_type is None else \
        await resolve_credit_type(ctx, account, body.credit_type)
    assert credit_type is not None  # (no credit type at all was answered above)
    amount = scaled(body.amount, credit_type) if body.amount is not None else 0
    at = now_ms()
    if not body.consume:
        return await _plain_check(ctx, account, body.product, credit_type, amount, at)
    assert key is not None
    return await consume(ctx, account, credit_type, body.product, amount, key, at)


async def consume(ctx: AppContext, account: AccountRef, credit_type: CreditTypeRef,
                  product: str, amount: int, key: str, at: int,
                  hold_expires_ms: int | None = None) -> CheckOut:
    """Check-and-consume: debit `amount` (minor units) under the usage uid `key`, atomically
    and only if allowed; answered once committed. A key consumed before is a duplicate. With
    `hold_expires_ms` it is a hold's (app/entitlements/holds.py): the journal flush writes the
    hold's row with its entries."""
    payload = _usage_payload(account, credit_type, key, product, amount, at, hold_expires_ms)
    args = DecideArgs(account.id, account.chain_arg, key, product, credit_type.code,
                      amount, at, "c", payload)
    decided_at, [decision] = await decide(ctx, account.root_id, [args])
    out = CheckOut(allowed=decision.status in ("ok", "duplicate"),
                   reason="ok" if decision.status == "duplicate" else decision.status,  # type: ignore[arg-type]
                   available=_amount(decision.available, credit_type), credit_type=credit_type.code)
    if decision.status == "ok":
        record = _record(account, decided_at, decision,
                         _usage_fields(account, credit_type, key, product, amount, at,
                                       hold_expires_ms))
        [outcome] = await ctx.journal.commit([record])
        out.consumed, out.duplicate = outcome == "accepted", outcome == "duplicate"
    elif decision.status == "duplicate":
        await _confirm_committed(ctx, account, [key])
        out.duplicate = True
    elif await ledger_repo.usage_exists(ctx.pool, account.id, [key]):
        # Redis lost the key's mark (FLUSHALL, or the mark expired) and the credit is gone since:
        # the consume was done before, so its retry is a duplicate, not a denial
        out.allowed, out.reason, out.duplicate = True, "ok", True
    return out


async def _plain_check(ctx: AppContext, account: AccountRef, product: str,
                       credit_type: CreditTypeRef, amount: int, at: int) -> CheckOut:
    """A check without consume: from this process's check cache when its answer is known
    and unchanged (app/hotstate/checkcache.py), else decided in Redis (and kept)."""
    cache = ctx.hot.cache
    slot = (account.id, product, credit_type.code)
    known = cache.lookup(slot, at) if cache is not None else None
    if known is not None:
        status = known.status(amount)
        out = known.memo.get(status)
        if out is None:  # the same answer is served again and again: its reply built once
            out = known.memo[status] = _checked(status, known.available, credit_type)
        return out
    token = cache.token(account.root_id) if cache is not None else None
    # while answers can be kept, the keys they depend on are declared for Redis to track
    tracked = ctx.hot.keys.check_reads(account.root_id, account.chain) if token else ()
    _, [decision] = await decide(ctx, account.root_id, [DecideArgs(
        account.id, account.chain_arg, "", product, credit_type.code, amount, at, "q", "")],
        tracked)
    status = decision.status
    if cache is not None:
        cache.keep(token, slot, Answer(account.root_id, blocked=status == "account_blocked",
                                       eligible=status != "no_eligible_balance",
                                       available=decision.available,
                                       until_ms=cache.ttl_end(at, decision.changes_at)))
    return _checked(status, decision.available, credit_type)


def _checked(status: str, available: int, credit_type: CreditTypeRef) -> CheckOut:
    return CheckOut(allowed=status == "ok", reason=status,  # type: ignore[arg-type]
                    available=_amount(available, credit_type), credit_type=credit_type.code)


_HEADER_KEY = re.compile(UID_PATTERN)


def _header_key(value: str | None) -> str | None:
    """The Idempotency-Key header as a consume key: held to the rules of `idempotency_key`
    (it becomes the debit's usage uid, and travels in the journal unescaped)."""
    if value is not None and (not _HEADER_KEY.match(value) or RESERVED_UID.match(value)):
        raise ValidationProblem("must be 1-128 of A-Z a-z 0-9 _ . : - (starting with a letter "
                                "or digit), not of the form r<digits>:…, s<digits>:…, "
                                "c<digits>:…, b<digits>:… or h<digits>:…",
                                field="Idempotency-Key")
    return value


def _record(account: AccountRef, at: int, decision: Decision,
            payload: dict[str, Any]) -> JournalRecord:
    return JournalRecord(account.root_id, decision.stream_id, "usage", payload, at,
                         decision.gen, decision.allocations, decision.overage,
                         flag_changes=decision.flag_change, crossings=decision.crossings)


async def _confirm_committed(ctx: AppContext, account: AccountRef, uids: list[str]) -> None:
    """A uid Redis has seen is only reported as a duplicate once its first use is in Postgres."""
    missing = set(uids) - await ledger_repo.usage_exists(ctx.pool, account.id, uids)
    if missing:
        await ctx.journal.recover_root(account.root_id)
        missing -= await ledger_repo.usage_exists(ctx.pool, account.id, list(missing))
    if missing:
        raise Unavailable("an earlier use of this uid is not committed yet; retry")


def _rejected(uid: Any, problem: Problem, prefix: str) -> UsageResult:
    field = problem.field or "body"
    return UsageResult(uid=uid if isinstance(uid, str) else None, status="rejected",
                       error=EventError(code=problem.code, field=prefix + field,
                                        message=problem.detail))


class Lookups:
    """Configuration a batch needs, looked up once per code however many events name it, and
    the batch's clock: the bounds its timestamps are held to, worked out once."""

    def __init__(self, ctx: AppContext, now: datetime) -> None:
        self.ctx = ctx
        self.accounts: dict[str, AccountRef | None] = {}
        self.products: dict[str, bool] = {}
        settings = ctx.settings
        self.latest = now + timedelta(seconds=settings.usage_future_skew_s)
        self.earliest = now - timedelta(seconds=settings.usage_max_age_s)
        self.now_ms = to_ms(now)
        # a timestamp from here on is drawn as now: credit granted a moment before a use
        # covers it, even from a backend whose clock is a little behind or cut to the second
        self.grace_from_ms = self.now_ms - settings.usage_grace_ms

    async def account(self, code: str) -> AccountRef | None:
        if code not in self.accounts:
            self.accounts[code] = await self.ctx.catalog.account(code)
        return self.accounts[code]

    async def product_exists(self, code: str) -> bool:
        if code not in self.products:
            self.products[code] = await self.ctx.catalog.product_exists(code)
        return self.products[code]


async def prepare(lookups: Lookups, index: int, event: UsageEvent) -> Prepared:
    ctx = lookups.ctx
    # (a batch names few codes: most events find theirs looked up, with no coroutine to run)
    account = lookups.accounts.get(event.account) or await lookups.account(event.account)
    if account is None:
        raise ValidationProblem(f"unknown account {event.account!r}", field="account")
    if not (lookups.products.get(event.product) or await lookups.product_exists(event.product)):
        raise ValidationProblem(f"unknown product {event.product!r}", field="product")
    if event.timestamp > lookups.latest:
        raise ValidationProblem("is in the future", field="timestamp")
    if event.timestamp < lookups.earliest:
        raise ValidationProblem("is older than the accepted window", field="timestamp")
    if event.credit_type is None and account.credit_type is not None:
        credit_type = account.credit_type
    else:
        credit_type = await resolve_credit_type(ctx, account, event.credit_type)
    amount = scaled(event.amount, credit_type)
    at = to_ms(event.timestamp)
    payload = _usage_payload(account, credit_type, event.uid, event.product, amount, at)
    eligible_at = max(at, lookups.now_ms) if at >= lookups.grace_from_ms else at
    return Prepared(index, event, account, credit_type, DecideArgs(
        account.id, account.chain_arg, event.uid, event.product, credit_type.code, amount,
        eligible_at, "u", payload))


async def record_usage(ctx: AppContext, items: list[Any], prefix: str) -> list[UsageResult]:
    """Debit a batch; every event is answered on its own and a rejected one affects no other."""
    results: dict[int, UsageResult] = {}
    by_root: dict[int, list[Prepared]] = defaultdict(list)
    lookups = Lookups(ctx, datetime.now(UTC))
    for index, (raw, event) in enumerate(zip(items, validate_items(UsageEvent, items), strict=True)):
        try:
            if isinstance(event, Problem):
                raise event
            prepared = await prepare(lookups, index, event)
        except ValidationProblem as problem:
            uid = raw.get("uid") if isinstance(raw, dict) else None
            results[index] = _rejected(uid, problem, prefix.format(index))
            continue
        by_root[prepared.account.root_id].append(prepared)
    results.update(await _debit_roots(ctx, list(by_root.values())))
    return [results[i] for i in range(len(items))]


# A debit computed by trusted code: (usage uid, account, credit type, product, minor units)
TrustedDebit = tuple[str, AccountRef, CreditTypeRef, str, int]


async def debit_trusted(ctx: AppContext, debits: Iterable[TrustedDebit],
                        answer: bool = True) -> None:
    """The usage path for debits computed by trusted code (rating, recurring charges, and
    their resends): codes already resolved, amounts already in the credit type's minor units,
    now as timestamp, so no pydantic or catalog work per debit. Decided per root and journaled
    exactly as `record_usage` does. One the hot state cannot take (not in 0 < minor <
    MAX_SCALED) is skipped: it stays unsent in the caller's durable row.

    `answer=False` is for callers whose debits are already durable in Postgres in a form that
    is replayed after a crash (rating's `rated_debits`): the call returns once the hot state
    has applied the debits (balances and entitlement flags are current) while the journal's
    group commit writes their ledger entries in the background. A crash in between loses
    nothing: the journal entry is committed by the orphan sweeper, or the debit is sent again
    from its durable row under the same uid. Otherwise it returns once they are committed."""
    at = now_ms()
    by_root: dict[int, list[Prepared]] = defaultdict(list)
    for index, (uid, account, credit_type, product, minor) in enumerate(debits):
        if 0 < minor < MAX_SCALED:
            by_root[account.root_id].append(Prepared(index, None, account, credit_type, DecideArgs(
                account.id, account.chain_arg, uid, product, credit_type.code, minor, at, "u",
                _usage_payload(account, credit_type, uid, product, minor, at))))
    await _debit_roots(ctx, list(by_root.values()), answer)


async def _debit_roots(ctx: AppContext, groups: list[list[Prepared]],
                       answer: bool = True) -> dict[int, UsageResult]:
    results: dict[int, UsageResult] = {}
    if not groups:
        return results
    if len(groups) == 1:  # the common case: no task per group
        outcomes = [await _debit_root(ctx, groups[0], answer)]
    else:
        outcomes = await asyncio.gather(*(_debit_root(ctx, group, answer) for group in groups))
    for group_results in outcomes:
        results.update(group_results)
    return results


async def _known_before_window(ctx: AppContext, group: list[Prepared]) -> set[int]:
    """Indexes of events older than Redis's uid memory that Postgres already has."""
    window = mark_window_start(now_ms())
    old: dict[AccountRef, list[Prepared]] = defaultdict(list)
    for prepared in group:
        if prepared.args.at_ms < window:
            old[prepared.account].append(prepared)
    known: set[int] = set()
    for account, events in old.items():
        seen = await ledger_repo.usage_exists(ctx.pool, account.id, [p.args.uid for p in events])
        known |= {p.index for p in events if p.args.uid in seen}
    return known


def _duplicate(prepared: Prepared) -> UsageResult:
    return UsageResult(uid=prepared.args.uid, status="duplicate",
                       credit_type=prepared.credit_type.code)


async def _debit_root(ctx: AppContext, group: list[Prepared],
                      answer: bool = True) -> dict[int, UsageResult]:
    known = await _known_before_window(ctx, group)
    results = {p.index: _duplicate(p) for p in group if p.index in known} if answer else {}
    group = [p for p in group if p.index not in known]
    if not group:
        return results
    at, decisions = await decide(ctx, group[0].account.root_id, [p.args for p in group])
    records, applied, duplicates = [], [], defaultdict(list)
    for prepared, decision in zip(group, decisions, strict=True):
        if decision.status == "duplicate":
            duplicates[prepared.account].append(prepared.args.uid)
            if answer:
                results[prepared.index] = _duplicate(prepared)
        else:
            a = prepared.args
            records.append(_record(prepared.account, at, decision, _usage_fields(
                prepared.account, prepared.credit_type, a.uid, a.product, a.amount, a.at_ms)))
            applied.append((prepared, decision))
    if not answer:  # (see debit_trusted) durable elsewhere: the commit need not be awaited
        if records:
            ctx.journal.commit_soon(records)
        return results
    outcomes = await ctx.journal.commit(records) if records else []
    for account, uids in duplicates.items():
        await _confirm_committed(ctx, account, uids)
    for (prepared, decision), outcome in zip(applied, outcomes, strict=True):
        ct = prepared.credit_type
        results[prepared.index] = _duplicate(prepared) if outcome != "accepted" else UsageResult(
            uid=prepared.args.uid, status="accepted", credit_type=ct.code,
            available=_amount(decision.available, ct), overage=_amount(decision.overage, ct))
    return results


async def live_balances(ctx: AppContext, code: str) -> AccountBalancesOut:
    account = await account_ref(ctx, code)
    return await balances_out(ctx, code, await read_hot(ctx, account), now_ms())


async def read_hot(ctx: AppContext, account: AccountRef,
                   tracked: tuple[str, ...] = ()) -> list[Any]:
    """The account's hot state as read.lua answers it: status, remaining, definitions,
    overage (rebuilt from Postgres first when Redis has forgotten the root). `tracked`: keys
    for Redis to track (app/hotstate/store.py: read_account)."""
    for _ in range(3):
        raw = await ctx.hot.read_account(account.root_id, account.id, tracked)
        if raw is not None:
            return raw
        await ctx.loader.ensure(account.root_id)
    raise Unavailable("hot state could not be rebuilt; retry")


def next_turn(raw: list[Any], now: int) -> int | None:
    """The next instant (ms) a balance of `raw` becomes effective or expires: until then the
    same hot state reads the same (None: no such instant)."""
    turns = [int(t) for definition in pairs(raw[2]).values()
             for t in definition.split("|")[2:4] if t != "0" and int(t) > now]
    return min(turns, default=None)


async def balances_out(ctx: AppContext, code: str, raw: list[Any], now: int
                       ) -> AccountBalancesOut:
    status, remaining, defs, overage = raw[0], pairs(raw[1]), pairs(raw[2]), pairs(raw[3])
    balances: list[LiveBalance] = []
    totals: dict[str, int] = defaultdict(int)
    types: dict[str, CreditTypeRef] = {}
    for balance_id, definition in sorted(defs.items(), key=lambda kv: int(kv[0])):
        ct_code, prio, eff, exp, st, scope = definition.split("|")
        if st not in ("a", "p"):
            continue
        credit_type = types.get(ct_code) or await ctx.catalog.credit_type(ct_code)
        assert credit_type is not None
        types[ct_code] = credit_type
        left = int(remaining.get(balance_id, "0"))
        drawable = st == "a" and int(eff) <= now and (exp == "0" or now < int(exp))
        totals[ct_code] += left if drawable else 0
        balances.append(LiveBalance(
            id=int(balance_id), credit_type=ct_code, remaining=_amount(left, credit_type),
            products=None if scope == "*" else scope.split(","), priority=int(prio),
            effective_at=ms_to_dt(int(eff)), expires_at=ms_to_dt(int(exp)) if exp != "0" else None,
            drawable=drawable))
    for ct_code in overage:
        if ct_code not in types:
            found = await ctx.catalog.credit_type(ct_code)
            assert found is not None
            types[ct_code] = found
    return AccountBalancesOut(account=code, status=status, balances=balances, totals=[
        CreditTypeAvailable(credit_type=c, available=_amount(totals.get(c, 0), types[c]),
                            overage=_amount(int(overage.get(c, "0")), types[c]))
        for c in sorted(types)])

