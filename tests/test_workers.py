"""The workers' pass: one failing step does not stop the steps after it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from app.errors import one_by_one
from app.workers import Step, run_pass
from tests.conftest import Api


async def _expired(db: asyncpg.Connection, balance_id: int, wait_s: float = 10.0) -> str | None:
    """The amount of the balance's expire entry, once the workers wrote it (None: not within
    `wait_s`)."""
    deadline = asyncio.get_running_loop().time() + wait_s
    while True:
        amount = await db.fetchval("SELECT amount FROM ledger_entries WHERE balance_id = $1 AND "
                                   "kind = 'expire'", balance_id)
        if amount is not None or asyncio.get_running_loop().time() >= deadline:
            return None if amount is None else str(amount)
        await asyncio.sleep(0.1)


async def test_a_step_that_fails_is_logged_and_the_next_runs_but_a_store_error_ends_the_pass(
        caplog: pytest.LogCaptureFixture) -> None:
    ran: list[str] = []

    def step(name: str, error: BaseException | None = None) -> Step:
        async def run() -> None:
            ran.append(name)
            if error is not None:
                raise error
        return name, run

    await run_pass([step("a", RuntimeError("a row it cannot handle")), step("b"),
                    step("c", ConnectionRefusedError()), step("d")])
    assert ran == ["a", "b", "c"]  # (a refused connection is a store error: d would fail too)
    assert "worker step a failed" in caplog.text and "skipped at c" in caplog.text


async def test_expiry_runs_while_an_earlier_step_fails_every_pass(
        api: Api, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    """The session's own workers, with the recurring-grants step (before expiry) broken."""
    failures = 0

    async def broken(ctx: Any) -> None:
        nonlocal failures
        failures += 1
        raise RuntimeError("a recurring grant it cannot handle")

    monkeypatch.setattr("app.workers.grant_recurring", broken)
    n = await api.setup()
    soon = datetime.now(UTC) + timedelta(milliseconds=300)
    grant = await api.grant(n["account"], "4.00", expires_at=soon.isoformat())
    assert await _expired(db, grant["id"]) == "-4.00"
    assert failures >= 1


async def test_one_by_one_goes_on_past_an_item_that_fails_but_not_past_a_store_error(
        caplog: pytest.LogCaptureFixture) -> None:
    async def work(item: int) -> int:
        if item == 2:
            raise KeyError("a row it cannot handle")
        if item == 4:
            raise TimeoutError  # a store that cannot answer
        return item * 10

    assert await one_by_one([1, 2, 3], work, "item") == 40
    assert "item failed for 2" in caplog.text
    with pytest.raises(TimeoutError):
        await one_by_one([1, 4, 5], work, "item")


async def test_a_balance_whose_expiry_fails_does_not_hold_up_the_next(
        api: Api, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    """Due expiries are read oldest first: the first failing every pass used to keep every
    later one from expiring."""
    import app.ledger.service as ledger_service

    n = await api.setup()
    now = datetime.now(UTC)
    first = await api.grant(n["account"], "1.00", expires_at=(now + timedelta(milliseconds=200))
                            .isoformat())
    second = await api.grant(n["account"], "2.00", expires_at=(now + timedelta(milliseconds=400))
                             .isoformat())
    expire = ledger_service.expire_balance

    async def failing_first(ctx: Any, balance_id: int) -> None:
        if balance_id == first["id"]:
            raise RuntimeError("a balance it cannot handle")
        await expire(ctx, balance_id)

    monkeypatch.setattr(ledger_service, "expire_balance", failing_first)
    assert await _expired(db, second["id"]) == "-2.00"
    assert await _expired(db, first["id"], wait_s=0) is None


async def test_an_account_whose_recurring_charges_fail_does_not_hold_up_the_next(
        api: Api, app: Any, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recurring-charge sweep settles the due accounts one by one: the first failing does
    not keep the others from their standing charges."""
    from app.rating import recurring
    from app.rating.periods import add_months
    from tests.test_rating_config import plan

    next_month = add_months(datetime.now(UTC).date().replace(day=1), 1)
    codes, ids = [], []
    for _ in range(2):
        names = await api.setup()
        await api.grant(names["account"], "100")
        plan_code = await plan(api, names["storage"], names["credit_type"], standing_charge="5")
        await api.call("POST", f"/v1/accounts/{names['account']}/plans", expect=201,
                       json={"plan": plan_code, "start_date": next_month.isoformat()})
        codes.append(names["account"])
        ids.append(await db.fetchval("SELECT id FROM accounts WHERE code = $1", names["account"]))
    settle = recurring._settle_current
    tried: list[int] = []

    async def failing_first(ctx: Any, plans: list[Any], by_plan: Any, day: Any) -> int:
        tried.append(plans[0]["account_id"])
        if plans[0]["account_id"] == ids[0]:
            raise RuntimeError("an account plan it cannot handle")
        return await settle(ctx, plans, by_plan, day)

    monkeypatch.setattr(recurring, "_settle_current", failing_first)
    drawn, due = await recurring._sweep(app.state.ctx, next_month, ids)
    assert sorted(tried) == sorted(ids) and sorted(due) == sorted(ids)
    assert drawn == 1  # the second account's standing charge, for next month


async def test_an_account_whose_bills_fail_is_listed_not_billed_and_the_others_are_billed(
        api: Api, app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bill run goes account by account: an error of one account's own (not a store's)
    leaves it in `failed` for the next run, and the accounts after it are billed."""
    from app.rating import bills
    from tests.test_rating_counters_realtime import attach, counter, license_plan

    codes = []
    for _ in range(2):
        names = await api.setup()
        plan_code = await license_plan(api, names, await counter(api), "peak",
                                       standing_charge="1.5")
        await attach(api, names["account"], plan_code)  # July 2024
        codes.append(names["account"])
    bill_account = bills._bill_account

    async def failing_first(ctx: Any, account: Any, items: Any, done: Any) -> None:
        if account.code == codes[0]:
            raise RuntimeError("a period it cannot handle")
        await bill_account(ctx, account, items, done)

    monkeypatch.setattr(bills, "_bill_account", failing_first)
    accounts = [await app.state.ctx.catalog.account(code) for code in codes]
    account_ids = [account.id for account in accounts if account is not None]
    outcome = await bills.run(app.state.ctx, datetime(2024, 8, 1).date(), account_ids)
    assert [code for code, _ in outcome.failed.values()] == [codes[0]]
    assert len(outcome.bills) == 1
    [bill] = (await api.call("GET", f"/v1/accounts/{codes[1]}/bills"))["data"]
    assert bill["total"] == "1.50"


async def test_re_rating_and_give_backs_go_on_past_an_account_that_fails(
        app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each already went on past a missing conversion rate or a store error; an error of the
    account's own (a bug) now too: logged, kept for the next pass."""
    from datetime import date

    from app.rating import giveback, rerate
    from app.rating import repository as repo

    ctx = app.state.ctx
    tried: list[int] = []

    async def settle_charge(ctx: Any, account_id: int, charge_key: str, period: Any) -> None:
        tried.append(account_id)
        if account_id == -1:
            raise RuntimeError("a charge it cannot handle")

    monkeypatch.setattr(giveback, "settle_charge", settle_charge)
    start = date(2026, 1, 1)
    await giveback.settle(ctx, [(-1, "p1", start), (-2, "p1", start)])
    assert tried == [-1, -2]

    requests = [{"account_id": -1, "requested_at": 1, "from_version": None},
                {"account_id": -2, "requested_at": 2, "from_version": None}]
    dropped: set[int] = set()

    async def rerate_requests(conn: Any, limit: int) -> list[dict[str, Any]]:
        return requests

    async def rerate_account(ctx: Any, account_id: int, **kwargs: Any) -> tuple[int, bool]:
        if account_id == -1:
            raise RuntimeError("an account it cannot handle")
        return 3, False

    async def drop(conn: Any, account_id: int, requested_at: Any) -> None:
        dropped.add(account_id)

    monkeypatch.setattr(repo, "rerate_requests", rerate_requests)
    monkeypatch.setattr(rerate, "rerate_account", rerate_account)
    monkeypatch.setattr(repo, "drop_rerate_request", drop)
    assert await rerate.rerate_pending(ctx) == 3
    assert dropped == {-2}  # the failed one is kept for the next pass
