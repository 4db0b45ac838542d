"""A bill says what of the credits its charges drew balances covered and what became the
account's overage (what the vendor collects for it), give-backs included."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal as D
from typing import Any

import asyncpg

from app.rating import drawdown
from tests.conftest import Api
from tests.procs import account_id, rows_once
from tests.test_rating_bills import (
    _day,
    daily_calls_plan,
    licenses_lowered_in_july,
    measure_on,
    run_bills,
)
from tests.test_rating_counters_realtime import adjust, attach, counter, license_plan


async def landed(api: Api, bill_id: int) -> dict[str, Any]:
    """The bill once its split adds up to what it drew: the bill run's own debits land in the
    ledger by the journal's group commit right behind its answer (up to 5 s)."""
    for _ in range(100):
        bill: dict[str, Any] = await api.call("GET", f"/v1/bills/{bill_id}")
        if D(bill["covered"]) + D(bill["overage"]) == D(bill["drawn"]):
            return bill
        await asyncio.sleep(0.05)
    raise AssertionError(f"bill {bill_id}: covered + overage never came to drawn: {bill}")


async def settled_events(db: asyncpg.Connection, account: str, count: int) -> list[dict[str, Any]]:
    """The account's `bill.settled` events' data, by bill, once there are `count` (up to 5 s:
    the bill run announces a bill once its debits have landed, or the workers' next pass)."""
    rows = await rows_once(db, count, "SELECT payload FROM webhook_events WHERE type = "
                           "'bill.settled' AND account_id = $1", await account_id(db, account))
    return sorted((json.loads(r["payload"])["data"] for r in rows), key=lambda d: d["bill"])


async def test_a_bill_splits_what_it_drew_into_covered_and_overage(
        api: Api, db: asyncpg.Connection) -> None:
    """A daily plan (standing charge 2, minimum spend 10, calls at 0.50) on an account with no
    credit when attached and 7.00 from then on."""
    names = await api.setup()
    account = names["account"]
    first, second = _day(-2), _day(-1)
    meter_code = await daily_calls_plan(api, names, first)  # 3 x 2 drawn: all overage
    await api.grant(account, "7.00")
    await measure_on(api, account, meter_code, first, files=8)    # 4.00: covered
    await measure_on(api, account, meter_code, second, files=30)  # 15.00: 3 covered, 12 not
    low_id, high_id = (await run_bills(api, account, _day(0)))["bills"]
    low, high = await landed(api, low_id), await landed(api, high_id)
    # day one: standing 2 (overage) + calls 4 (covered) + the top-up 4 (no credit left)
    assert (low["total"], low["drawn"], low["covered"], low["overage"]) == (
        "10.00", "10.00", "4.00", "6.00")
    # day two: standing 2 (overage) + calls 15 (3 covered, 12 overage)
    assert (high["total"], high["drawn"], high["covered"], high["overage"]) == (
        "17.00", "17.00", "3.00", "14.00")
    listed = await api.call("GET", f"/v1/accounts/{account}/bills")
    assert [(b["covered"], b["overage"]) for b in listed["data"]] == [("4.00", "6.00"),
                                                                     ("3.00", "14.00")]
    # and says so once, by `bill.settled`, for the vendor's invoice
    events = await settled_events(db, account, 2)
    assert [(e["bill"], e["total"], e["drawn"], e["covered"], e["overage"], e["charges_total"])
            for e in events] == [(low_id, "10.00", "10.00", "4.00", "6.00", "0.00"),
                                 (high_id, "17.00", "17.00", "3.00", "14.00", "0.00")]
    # bill-to-date splits the same way, a billed day's with its top-up, today's as it stands
    for day, split in ((first, ("10.00", "4.00", "6.00")), (_day(0), ("2.00", "0.00", "2.00"))):
        [to_date] = (await api.call("GET", f"/v1/accounts/{account}/usage",
                                    params={"at": str(day)}))["plans"]
        assert (to_date["drawn"], to_date["covered"], to_date["overage"]) == split
    # today's standing charge is on no bill yet: the account owes it besides the two
    totals = (await api.live(account))["totals"]
    assert [D(t["overage"]) for t in totals] == [D(6) + D(14) + D(2)]


async def test_a_give_back_takes_back_overage_before_credit(api: Api) -> None:
    """July's licenses, 10 from the 1st and 20 from the 16th, drawn at the high-water mark
    (310 + 160) from 400 of credit: 70 became overage. Lowered to 5 from the 26th, the month
    comes to 380; the bill run gives 90 back, newest debit first, its overage first."""
    names, _ = await licenses_lowered_in_july(api, "400")
    account = names["account"]
    [bill_id] = (await run_bills(api, account, "2024-08-01"))["bills"]
    bill = await landed(api, bill_id)
    assert (bill["total"], bill["drawn"], bill["settled"], bill["covered"],
            bill["overage"]) == ("380.00", "380.00", "-90.00", "380.00", "0.00")
    assert await api.available(account) == "20.00"


async def test_the_workers_announce_a_bill_a_crash_left_unannounced(
        api: Api, db: asyncpg.Connection, monkeypatch: Any) -> None:
    """The bill run announces its bills itself once their debits land; killed before that, the
    workers' next pass announces them, once."""
    names = await api.setup()
    account = names["account"]
    await api.grant(account, "5")
    licenses = await counter(api)
    await attach(api, account, await license_plan(api, names, licenses, "prorate"))
    await adjust(api, account, licenses, "2024-07-01", 1)  # 31: 5 covered, 26 owed

    async def _idle(*_: Any) -> int:
        return 0
    with monkeypatch.context() as crashed:
        crashed.setattr("app.rating.bills.announce_settled", _idle)
        crashed.setattr("app.workers.announce_settled", _idle)
        [bill_id] = (await run_bills(api, account, "2024-08-01"))["bills"]
        await landed(api, bill_id)
        await asyncio.sleep(0.6)  # a workers' pass (every 0.5 s in tests) announces nothing
        assert await settled_events(db, account, 0) == []
    [event] = await settled_events(db, account, 1)  # the workers' pass after it
    assert (event["bill"], event["covered"], event["overage"]) == (bill_id, "5.00", "26.00")
    await asyncio.sleep(0.6)  # and no second time
    assert await db.fetchval("SELECT count(*) FROM webhook_events WHERE type = 'bill.settled' "
                             "AND account_id = $1", await account_id(db, account)) == 1


async def test_a_bill_is_announced_only_once_its_debits_are_in_the_ledger(
        api: Api, app: Any, db: asyncpg.Connection, monkeypatch: Any) -> None:
    """The bill run killed after a bill's commit, before its top-up debit went through the
    usage path: the bill is not announced (its split is not final) until the workers send
    the debit, then it is, with the top-up in it."""
    names = await api.setup()
    account = names["account"]
    await daily_calls_plan(api, names, _day(-1))  # 2 a day drawn, no credit: owed

    async def _lost(*_: Any) -> None:
        return None
    with monkeypatch.context() as crashed:
        crashed.setattr("app.rating.recurring.send", _lost)
        [bill_id] = (await run_bills(api, account, _day(0)))["bills"]
    bill = await api.call("GET", f"/v1/bills/{bill_id}")
    assert (bill["drawn"], bill["covered"], bill["overage"]) == ("10.00", "0.00", "2.00")
    assert await settled_events(db, account, 0) == []
    await drawdown.send_unsent(app.state.ctx, older_than_s=0)  # the workers' repair
    [event] = await settled_events(db, account, 1)
    assert (event["bill"], event["drawn"], event["covered"], event["overage"]) == (
        bill_id, "10.00", "0.00", "10.00")


async def test_a_bill_is_announced_only_once_its_give_backs_are_paid(
        api: Api, db: asyncpg.Connection, monkeypatch: Any) -> None:
    """The bill run killed before paying a bill's give-back: not announced until the workers
    pay it (give-backs older than 1 s, every pass)."""
    names, _ = await licenses_lowered_in_july(api, "400")
    account = names["account"]

    async def _lost(*_: Any) -> None:
        return None
    with monkeypatch.context() as crashed:
        crashed.setattr("app.rating.giveback.settle", _lost)
        [bill_id] = (await run_bills(api, account, "2024-08-01"))["bills"]
        assert await settled_events(db, account, 0) == []
    [event] = await settled_events(db, account, 1)  # the workers' give-back pass, then this
    assert (event["bill"], event["drawn"], event["covered"], event["overage"]) == (
        bill_id, "380.00", "380.00", "0.00")


async def test_an_account_without_credits_has_no_split(
        api: Api, db: asyncpg.Connection) -> None:
    names = await api.setup()
    account = f"{names['account']}-nc"
    await api.call("POST", "/v1/accounts", expect=201, json={"code": account, "name": "No credit"})
    licenses = await counter(api)
    await attach(api, account, await license_plan(api, names, licenses, "peak"))
    await adjust(api, account, licenses, "2024-07-01", 3)
    [bill_id] = (await run_bills(api, account, "2024-08-01"))["bills"]
    bill = await api.call("GET", f"/v1/bills/{bill_id}")
    assert (bill["total"], bill["drawn"], bill["covered"], bill["overage"]) == (
        "93.00", None, None, None)
    [event] = await settled_events(db, account, 1)  # at once: nothing to wait for
    assert (event["bill"], event["total"], event["covered"]) == (bill_id, "93.00", None)


async def test_a_give_back_first_reverses_what_the_other_charges_left_owing(api: Api) -> None:
    """Two counters on one plan, 400 of credit: licenses (10 from July 1st: 310) drawn first,
    all covered; seats (5 from July 1st: 155) next, 90 covered and 65 owed. Licenses lowered
    to 5 from the 16th come to 230: the bill run gives 80 back, and the seats' 65 of overage
    goes before any credit comes back (15)."""
    names = await api.setup()
    account = names["account"]
    await api.grant(account, "400")
    licenses, seats = await counter(api), await counter(api)
    code = await license_plan(api, names, licenses, "prorate")
    await api.call("POST", "/v1/pricings", expect=201, json={
        "plan": code, "counter": seats, "type": "per_unit", "counter_mode": "prorate",
        "bands": [{"up_to": None, "price": "31"}], "start_date": "2024-07-01"})
    await attach(api, account, code)
    await adjust(api, account, licenses, "2024-07-01", 10)
    await adjust(api, account, seats, "2024-07-01", 5)
    await adjust(api, account, licenses, "2024-07-16", 5)
    [bill_id] = (await run_bills(api, account, "2024-08-01"))["bills"]
    bill = await landed(api, bill_id)
    assert (bill["total"], bill["settled"], bill["covered"], bill["overage"]) == (
        "385.00", "-80.00", "385.00", "0.00")
    assert await api.available(account) == "15.00"
    assert [D(t["overage"]) for t in (await api.live(account))["totals"]] == [D(0)]
