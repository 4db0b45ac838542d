"""Counters and standing charges drawn down in real time (DESIGN invariant 8): at each counter
adjustment, at attachment, by the worker's sweep when a period starts (in several processes at
once) and at the first measurement of a period; what is drawn equals bill-to-date's total."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal as D
from typing import Any

import asyncpg
import pytest

from app import workers
from app.rating import recurring
from app.rating import recurring_repository as rrepo
from app.rating.periods import add_months
from app.settings import Settings
from tests.conftest import Api
from tests.procs import account_id, run_apps
from tests.test_rating_config import _code, fiat_usd, meter, plan
from tests.test_rating_drawdown import aggregation, measure, price

JULY, AUGUST = "2024-07-01", "2024-08-01"


async def counter(api: Api) -> str:
    code = _code("licenses")
    await api.call("POST", "/v1/counters", expect=201,
                   json={"code": code, "name": "Dev licenses", "unit": "licenses"})
    return code


async def license_plan(api: Api, names: dict[str, str], counter_code: str, mode: str,
                       currency: str | None = None, price_: str = "31",
                       standing_charge: str = "0") -> str:
    """A monthly plan pricing the counter per unit (31 a month: 1 a license-day in July)."""
    plan_code = await plan(api, names["storage"], currency or names["credit_type"],
                           standing_charge=standing_charge)
    await api.call("POST", "/v1/pricings", expect=201, json={
        "plan": plan_code, "counter": counter_code, "type": "per_unit", "counter_mode": mode,
        "bands": [{"up_to": None, "price": price_}], "start_date": JULY})
    return plan_code


async def attach(api: Api, account: str, plan_code: str, start: str = JULY,
                 end: str | None = AUGUST) -> dict[str, Any]:
    result: dict[str, Any] = await api.call(
        "POST", f"/v1/accounts/{account}/plans", expect=201,
        json={"plan": plan_code, "start_date": start, "end_date": end})
    return result


async def adjust(api: Api, account: str, counter_code: str, day: str, level: int,
                 expect: int = 200) -> dict[str, Any]:
    result: dict[str, Any] = await api.call(
        "POST", f"/v1/accounts/{account}/counter-adjustments", expect=expect,
        json={"counter": counter_code, "effective": day, "level": level})
    return result


def amounts(result: dict[str, Any]) -> list[D]:
    return sorted(D(d["amount"]) for d in result["debits"])


async def drawn_in_postgres(db: asyncpg.Connection, account: str) -> tuple[D, D, D]:
    """(rated debits, usage events, ledger debits + overage) of an account, from Postgres.

    A rated debit is answered once it is durable in `rated_debits` and applied to the hot
    state; its usage event and ledger entries follow in the journal's group commit right
    behind (README, "What a 2xx waits for"). So this waits, up to 5 s, for the three to agree,
    and returns what it found then."""
    acct = await account_id(db, account)
    deadline = time.monotonic() + 5.0
    while True:
        rated = await db.fetchval("SELECT COALESCE(sum(amount), 0) FROM rated_debits "
                                  "WHERE account_id = $1", acct)
        usage = await db.fetchval("SELECT COALESCE(sum(amount), 0) FROM usage_events "
                                  "WHERE account_id = $1", acct)
        ledger = await db.fetchval("SELECT COALESCE(-sum(amount), 0) FROM ledger_entries "
                                   "WHERE account_id = $1 AND kind IN ('debit', 'overage')", acct)
        found = D(rated), D(usage), D(ledger)
        if found[0] == found[1] == found[2] or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)


async def bill(api: Api, account: str, at: str) -> dict[str, Any]:
    [usage] = (await api.call("GET", f"/v1/accounts/{account}/usage", params={"at": at}))["plans"]
    return dict(usage)


async def assert_bill_agrees(api: Api, db: asyncpg.Connection, account: str, at: str,
                             total: D) -> None:
    """Invariant 8: bill-to-date's total for the period is what the debits took, all the way
    to the ledger."""
    usage = await bill(api, account, at)
    assert D(usage["total"]) == total and D(usage["drawn"]) == total, usage
    assert await drawn_in_postgres(db, account) == (total, total, total)


@pytest.mark.parametrize("mode", ["prorate", "peak"])
async def test_license_counter_raised_and_lowered_mid_month_draws_at_each_adjustment(
        api: Api, db: asyncpg.Connection, mode: str) -> None:
    names = await api.setup()
    account = names["account"]
    await api.grant(account, "2000")
    licenses = await counter(api)
    attached = await attach(api, account, await license_plan(api, names, licenses, mode))
    assert attached["debits"] == []  # no licenses yet: nothing to draw
    # 10 licenses from July 1st: the whole month at 10 (310), as the bill would say now
    assert amounts(await adjust(api, account, licenses, JULY, 10)) == [D(310)]
    # 20 from the 16th: prorated, 10 x 15 + 20 x 16 = 470 (160 more); at the peak 620
    raised = await adjust(api, account, licenses, "2024-07-16", 20)
    assert amounts(raised) == ([D(160)] if mode == "prorate" else [D(310)])
    assert raised["debits"][0]["pricing"].startswith("p")
    assert raised["debits"][0]["product"] == names["storage"]
    # lowered to 5 from the 26th: the charge goes down (380 prorated), nothing is given back
    # mid-period: the drawn amount stays at its high-water mark, the bill run settles it
    assert (await adjust(api, account, licenses, "2024-07-26", 5))["debits"] == []
    usage = await bill(api, account, "2024-07-20")
    if mode == "prorate":
        assert D(usage["total"]) == 150 + 200 + 30 and D(usage["drawn"]) == 470
        assert D(await api.available(account)) == 2000 - 470
        # raised to 40 from the 28th: 150 + 200 + 5 x 2 + 40 x 4 = 520, 50 above the mark
        assert amounts(await adjust(api, account, licenses, "2024-07-28", 40)) == [D(50)]
        total = D(520)
    else:
        await assert_bill_agrees(api, db, account, "2024-07-20", D(620))
        assert D(await api.available(account)) == 2000 - 620
        # a new peak of 40 from the 28th: 1240, 620 more
        assert amounts(await adjust(api, account, licenses, "2024-07-28", 40)) == [D(620)]
        total = D(1240)
    await assert_bill_agrees(api, db, account, "2024-07-20", total)
    assert D(await api.available(account)) == 2000 - total
    # the same adjustment again changes nothing
    again = await adjust(api, account, licenses, "2024-07-26", 5)
    assert again["debits"] == []
    # each debit is recorded once under a uid fixed by the period's drawn total
    uids = await db.fetch("SELECT uid FROM usage_events WHERE account_id = $1 ORDER BY uid",
                          await account_id(db, account))
    assert all(r["uid"].startswith("c") and ":2024-07-01:" in r["uid"] for r in uids)


async def test_standing_charge_and_counters_at_attachment_after_the_adjustments(
        api: Api, db: asyncpg.Connection) -> None:
    names = await api.setup()
    account = names["account"]
    await api.grant(account, "1000")
    licenses = await counter(api)
    # levels set before any plan prices them: nothing to draw yet
    assert (await adjust(api, account, licenses, JULY, 4))["debits"] == []
    assert (await adjust(api, account, licenses, "2024-07-11", 6))["debits"] == []
    assert D(await api.available(account)) == 1000
    plan_code = await license_plan(api, names, licenses, "prorate", standing_charge="20")
    attached = await attach(api, account, plan_code)
    # July: standing charge 20, licenses 4 x 10 days + 6 x 21 days = 166
    assert amounts(attached) == [D(20), D(166)]
    standing = next(d for d in attached["debits"] if d["pricing"].startswith("s"))
    assert standing["pricing"] == f"s{attached['id']}" and standing["product"] == names["storage"]
    usage = await bill(api, account, "2024-07-31")
    assert D(usage["standing_charge_drawn"]) == 20
    await assert_bill_agrees(api, db, account, "2024-07-31", D(186))
    assert D(await api.available(account)) == 1000 - 186
    assert await db.fetchval("SELECT count(*) FROM usage_events WHERE account_id = $1 AND uid = $2",
                             await account_id(db, account), f"s{attached['id']}:2024-07-01") == 1


async def test_a_plan_attached_over_three_past_months_draws_each_of_them(
        api: Api, db: asyncpg.Connection) -> None:
    names = await api.setup()
    account = names["account"]
    licenses = await counter(api)
    await adjust(api, account, licenses, "2024-08-01", 2)
    plan_code = await license_plan(api, names, licenses, "peak", price_="7",
                                   standing_charge="3.50")
    attached = await attach(api, account, plan_code, JULY, "2024-10-01")
    # July, August, September: the standing charge each; 2 licenses at 7 from August on
    assert amounts(attached) == [D("3.50")] * 3 + [D(14)] * 2
    for day, total in (("2024-07-15", D("3.50")), ("2024-08-15", D("17.50")),
                       ("2024-09-15", D("17.50"))):
        usage = await bill(api, account, day)
        assert D(usage["total"]) == total and D(usage["drawn"]) == total
    assert await drawn_in_postgres(db, account) == (D("38.50"),) * 3  # all overage: no grant


async def test_prices_in_usd_draw_counters_and_the_standing_charge_in_custom_credits(
        api: Api, db: asyncpg.Connection) -> None:
    # whole credits; 1 credit = 0.01 USD, 0.02 USD from the 16th
    names = await api.setup(credit_type="credits", decimal_places=0)
    account = names["account"]
    usd = await fiat_usd(api)
    rates = f"/v1/credit-types/{names['credit_type']}/conversion-rates"
    for day, rate in ((JULY, "0.01"), ("2024-07-16", "0.02")):
        await api.call("POST", rates, json={"fiat": usd, "effective": day, "rate": rate})
    await api.grant(account, "10000")
    licenses = await counter(api)
    plan_code = await license_plan(api, names, licenses, "prorate", currency=usd,
                                   price_="3.10", standing_charge="1.005")
    # the standing charge, 1.005 USD on July 1st: 100.5 credits, rounded once (half up): 101
    assert amounts(await attach(api, account, plan_code)) == [D(101)]
    # 10 licenses all month at 3.10 USD: 31 USD at 0.01 = 3100 credits
    first = await adjust(api, account, licenses, JULY, 10)
    assert [(d["amount"], d["credit_type"]) for d in first["debits"]] == \
        [("3100", names["credit_type"])]
    # 10 more from the 16th: 10 x 16 days x 0.10 USD = 16 USD, at the rate of the 16th: 800
    assert amounts(await adjust(api, account, licenses, "2024-07-16", 20)) == [D(800)]
    # one more from the 21st: 11 days x 0.10 = 1.10 USD = 55 credits (each charge has its own
    # running total: the standing charge's half credit is not carried into it)
    assert amounts(await adjust(api, account, licenses, "2024-07-21", 21)) == [D(55)]
    usage = await bill(api, account, "2024-07-21")
    assert usage["currency"] == usd and D(usage["total"]) == D("1.005") + 31 + 16 + D("1.10")
    assert D(usage["drawn"]) == 101 + 3100 + 800 + 55
    assert D(usage["standing_charge_drawn"]) == 101
    assert await drawn_in_postgres(db, account) == (D(4056),) * 3
    assert D(await api.available(account)) == 10000 - 4056


async def test_no_conversion_rate_refuses_the_adjustment_and_stores_nothing(
        api: Api, db: asyncpg.Connection) -> None:
    names = await api.setup(credit_type="credits", decimal_places=0)
    usd = await fiat_usd(api)
    licenses = await counter(api)
    await attach(api, names["account"], await license_plan(api, names, licenses, "peak",
                                                           currency=usd))
    body = await adjust(api, names["account"], licenses, JULY, 3, expect=422)
    assert body["field"] == "account" and "conversion rate" in body["detail"]
    assert await db.fetchval("SELECT count(*) FROM counter_adjustments WHERE account_id = $1",
                             await account_id(db, names["account"])) == 0


async def test_a_new_period_draws_the_standing_charge_and_the_carried_level_once(
        api: Api, app: Any, db: asyncpg.Connection) -> None:
    names = await api.setup()
    account = names["account"]
    await api.grant(account, "1000")
    licenses = await counter(api)
    this_month = datetime.now(UTC).date().replace(day=1)
    starts = [add_months(this_month, k) for k in (1, 2)]
    # 3 licenses from today; a plan that starts next month: nothing has started, nothing drawn
    assert (await adjust(api, account, licenses, datetime.now(UTC).date().isoformat(),
                         3))["debits"] == []
    plan_code = await license_plan(api, names, licenses, "prorate", price_="10",
                                   standing_charge="2.50")
    attached = await attach(api, account, plan_code, starts[0].isoformat(), None)
    assert attached["debits"] == []
    ctx = app.state.ctx
    mine = [await account_id(db, account)]
    assert await recurring.sweep(ctx, this_month, mine) == 0
    for start in starts:  # the first day of each period, swept again and again
        assert await recurring.sweep(ctx, start, mine) == 2
        for _ in range(3):
            assert await recurring.sweep(ctx, start, mine) == 0
        usage = await bill(api, account, start.isoformat())
        # the level carried over: 3 licenses all period at 10, plus the standing charge
        assert D(usage["total"]) == D("32.50") and D(usage["drawn"]) == D("32.50")
    assert D(await api.available(account)) == 1000 - 65
    assert await drawn_in_postgres(db, account) == (D(65),) * 3
    uids = {r["uid"] for r in await db.fetch("SELECT uid FROM usage_events WHERE account_id = $1",
                                             await account_id(db, account))}
    assert {f"s{attached['id']}:{s.isoformat()}" for s in starts} <= uids and len(uids) == 4


async def _legacy_account_plans(api: Api, db: asyncpg.Connection, n: int,
                                standing_charge: str) -> tuple[list[str], list[int]]:
    """Accounts whose plan was attached before real-time standing charges existed (the rows an
    upgrade finds): nothing has drawn their current period."""
    names = await api.setup()
    plan_code = await plan(api, names["storage"], names["credit_type"],
                           standing_charge=standing_charge)
    plan_id = await db.fetchval("SELECT id FROM plans WHERE code = $1", plan_code)
    accounts, ap_ids = [], []
    for _ in range(n):
        code = f"acct-{uuid.uuid4().hex[:8]}"
        await api.call("POST", "/v1/accounts", expect=201, json={
            "code": code, "name": "Legacy Inc.", "credit_type": names["credit_type"]})
        await api.grant(code, "100")
        ap_ids.append(await db.fetchval(
            """INSERT INTO account_plans (account_id, plan_id, start_date, billing_anchor)
               SELECT $1, $2, d, d FROM (SELECT date_trunc('month', now() AT TIME ZONE 'UTC')::date
                                         AS d) month
               RETURNING id""", await account_id(db, code), plan_id))
        accounts.append(code)
    return accounts, ap_ids


async def test_standing_charge_drawn_once_when_two_processes_sweep_at_once(
        settings: Settings, keys: dict[str, str], api: Api, db: asyncpg.Connection,
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def not_here(ctx: Any) -> int:
        return 0

    monkeypatch.setattr(workers, "draw_recurring_charges", not_here)  # only the two processes
    async with run_apps(settings, 2) as apps:
        accounts, ap_ids = await _legacy_account_plans(api, db, 6, "12.34")
        period = datetime.now(UTC).date().replace(day=1).isoformat()
        uids = [f"s{ap}:{period}" for ap in ap_ids]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = await db.fetchval("SELECT count(*) FROM usage_events WHERE uid = ANY($1)",
                                      uids)
            if found == len(uids):
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(2.5)  # a few more passes of both processes' sweeps
        assert not apps.tracebacks(), apps.tracebacks()
        async with apps[1].client() as client:
            process_api = Api(client, keys)
            for code in accounts:
                assert D(await process_api.available(code)) == D("87.66")
    for code, uid in zip(accounts, uids, strict=True):
        assert await drawn_in_postgres(db, code) == (D("12.34"),) * 3
        acct = await account_id(db, code)
        assert [r["uid"] for r in await db.fetch(
            "SELECT uid FROM usage_events WHERE account_id = $1", acct)] == [uid]


async def test_the_first_measurement_of_a_period_draws_its_standing_charge(
        api: Api, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    async def not_now(ctx: Any) -> int:
        return 0

    monkeypatch.setattr(workers, "draw_recurring_charges", not_now)  # the sweep is not first
    [account], [ap_id] = await _legacy_account_plans(api, db, 1, "4.20")
    plan_id = await db.fetchval("SELECT plan_id FROM account_plans WHERE id = $1", ap_id)
    plan_code = await db.fetchval("SELECT code FROM plans WHERE id = $1", plan_id)
    meter_code = await meter(api)
    await price(api, plan_code, "per_unit", [(None, "1")],
                aggregation=await aggregation(api, meter_code, "gb", "SUM"))
    await asyncio.sleep(1.2)  # (a worker pass already running when the sweep was replaced)
    assert D(await api.available(account)) == 100
    result = await measure(api, account, meter_code, gb=2, files=1, seconds=1)
    assert amounts(result) == [D(2)]
    assert D(await api.available(account)) == D(100) - D(2) - D("4.20")
    today = datetime.now(UTC).date().isoformat()
    usage = (await api.call("GET", f"/v1/accounts/{account}/usage", params={"at": today}))
    assert D(usage["plans"][0]["drawn"]) == D("6.20") == D(usage["plans"][0]["total"])


async def test_the_worker_sweeps_every_plan_only_when_the_day_or_the_configuration_changes(
        api: Api, app: Any, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between those, a pass retries only the accounts the last one could not settle (here: no
    conversion rate yet), and once they are settled it reads nothing but the version."""
    names = await api.setup(credit_type="credits", decimal_places=0)
    account = names["account"]
    await api.grant(account, "10000")
    usd = await fiat_usd(api)
    this_month = datetime.now(UTC).date().replace(day=1)
    days = [add_months(this_month, k) for k in (1, 2)]
    plan_code = await license_plan(api, names, await counter(api), "prorate", currency=usd,
                                   standing_charge="2.50")
    assert (await attach(api, account, plan_code, days[0].isoformat(), None))["debits"] == []
    ctx, mine = app.state.ctx, await account_id(db, account)
    passes: list[list[int] | None] = []  # what each pass over these days read: None for all
    read = rrepo.active_account_plans

    async def counted(conn: Any, day: Any, account_ids: list[int] | None) -> Any:
        if day in days:  # (the app's own worker sweeps today meanwhile)
            passes.append(account_ids)
        return await read(conn, day, account_ids)

    monkeypatch.setattr(rrepo, "active_account_plans", counted)
    memory = recurring.SweepMemory()

    async def sweep(day: Any) -> list[list[int] | None]:
        passes.clear()
        await recurring.sweep_when_due(ctx, memory, day)
        return passes

    # a new day: every plan; this account's standing charge cannot be drawn without a rate
    assert await sweep(days[0]) == [None] and mine in memory.unsettled
    left = list(memory.unsettled)
    assert await sweep(days[0]) == [left] and mine in memory.unsettled
    assert D(await api.available(account)) == 10000
    # a conversion rate is no plan change: the retry of the unsettled account draws it
    await api.call("POST", f"/v1/credit-types/{names['credit_type']}/conversion-rates",
                   json={"fiat": usd, "effective": days[0].isoformat(), "rate": "0.01"})
    left = list(memory.unsettled)
    assert await sweep(days[0]) == [left]
    assert D(await api.available(account)) == 10000 - 250
    await sweep(days[0])
    assert mine not in memory.unsettled  # found settled
    memory.unsettled = []  # (any other test's account that cannot be settled either)
    assert await sweep(days[0]) == []  # nothing changed: only the version was read
    await plan(api, names["storage"], usd)  # a plan created: every plan again
    assert await sweep(days[0]) == [None]
    memory.unsettled = []
    assert await sweep(days[0]) == []
    # the next period's first day: every plan, and its standing charge drawn once
    assert await sweep(days[1]) == [None]
    assert D(await api.available(account)) == 10000 - 500
    await sweep(days[1])
    assert D(await api.available(account)) == 10000 - 500
