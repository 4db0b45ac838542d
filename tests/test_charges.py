"""Charges: an amount in an account plan's currency on the bill of the period holding its
day, billed (not drawn from credits), on exactly one bill, voidable until billed."""

from __future__ import annotations

import asyncio
import json
import uuid
from decimal import Decimal as D
from typing import Any

import asyncpg

from app.rating import bills
from tests.conftest import Api
from tests.procs import account_id, run_apps
from tests.test_rating_bills import _day, daily_calls_plan, run_bills
from tests.test_rating_config import plan
from tests.test_rating_counters_realtime import adjust, attach, counter, license_plan


async def _charge(api: Api, account: str, expect: int = 201, **body: Any) -> dict[str, Any]:
    result: dict[str, Any] = await api.call(
        "POST", f"/v1/accounts/{account}/charges", expect=expect, json=body,
        headers={"Idempotency-Key": uuid.uuid4().hex})
    return result


async def test_charges_are_billed_with_their_period_and_draw_nothing(
        api: Api, db: asyncpg.Connection) -> None:
    names = await api.setup()
    account = names["account"]
    await api.grant(account, "1000")
    licenses = await counter(api)
    attached = await attach(api, account, await license_plan(api, names, licenses, "peak"))
    await adjust(api, account, licenses, "2024-07-01", 2)  # 2 x 31 = 62, drawn
    onboarding = await _charge(api, account, amount="500", description="Onboarding",
                               day="2024-07-10")
    assert (onboarding["account_plan"], onboarding["amount"], onboarding["bill"],
            onboarding["day"], onboarding["voided_at"]) == (attached["id"], "500.00", None,
                                                            "2024-07-10", None)
    top_up = await _charge(api, account, amount="120.50", description="1,000 credits granted",
                           day="2024-07-20", account_plan=attached["id"])
    mistake = await _charge(api, account, amount="9", description="typo", day="2024-07-21")
    voided = await api.call("POST", f"/v1/charges/{mistake['id']}/void")
    assert voided["voided_at"] is not None
    # again: answered as it is
    assert (await api.call("POST", f"/v1/charges/{mistake['id']}/void")) == voided
    assert D(await api.available(account)) == 1000 - 62  # charges are billed, not drawn

    [july] = (await api.call("GET", f"/v1/accounts/{account}/usage",
                             params={"at": "2024-07-15"}))["plans"]
    assert [(c["description"], c["amount"]) for c in july["charges"]] == [
        ("Onboarding", "500.00"), ("1,000 credits granted", "120.50")]
    assert (july["total"], july["charges_total"]) == ("62", "620.50")

    [bill_id] = (await run_bills(api, account, "2024-08-01"))["bills"]
    bill = await api.call("GET", f"/v1/bills/{bill_id}")
    assert (bill["total"], bill["drawn"], bill["charges_total"]) == ("62.00", "62.00", "620.50")
    assert [c["id"] for c in bill["charges"]] == [onboarding["id"], top_up["id"]]
    for charge in (onboarding, top_up):
        assert (await api.call("GET", f"/v1/charges/{charge['id']}"))["bill"] == bill_id
    assert (await api.call("GET", f"/v1/charges/{mistake['id']}"))["bill"] is None
    payload = json.loads(await db.fetchval(
        "SELECT payload FROM webhook_events WHERE type = 'bill.finalized' "
        "AND payload->'data'->>'bill' = $1", str(bill_id)))
    assert payload["data"]["charges_total"] == "620.50"
    listed = await api.call("GET", f"/v1/accounts/{account}/charges", params={"limit": 2})
    rest = await api.call("GET", f"/v1/accounts/{account}/charges",
                          params={"cursor": listed["next_cursor"]})
    assert [c["id"] for c in listed["data"] + rest["data"]] == [
        onboarding["id"], top_up["id"], mistake["id"]]

    # July is billed: a charge for it is refused, a billed one cannot be voided
    problem = await _charge(api, account, expect=409, amount="1", description="late",
                            day="2024-07-31")
    assert problem["field"] == "day"
    problem = await api.call("POST", f"/v1/charges/{top_up['id']}/void", expect=409)
    assert problem["field"] == "id" and str(bill_id) in problem["detail"]
    assert (await api.call("GET", f"/v1/bills/{bill_id}")) == bill


async def test_a_charge_after_an_end_moved_earlier_goes_on_the_last_bill(
        api: Api, app: Any, db: asyncpg.Connection) -> None:
    """A daily plan from two days ago to in five days, a charge for in three days, then the
    plan ended tomorrow: the charge goes on the plan's last bill, today's."""
    names = await api.setup()
    account = names["account"]
    daily = await plan(api, names["storage"], names["credit_type"], bill_frequency="daily")
    attached = await attach(api, account, daily, str(_day(-2)), str(_day(5)))
    later = await _charge(api, account, amount="40", description="later", day=str(_day(3)))
    await api.call("POST", f"/v1/accounts/{account}/plans/{attached['id']}/end",
                   json={"end_date": str(_day(1))})
    done = await bills.run(app.state.ctx, _day(1), [await account_id(db, account)])
    assert len(done.bills) == 3
    billed = [await api.call("GET", f"/v1/bills/{b}") for b in done.bills]
    assert [(b["period_start"], b["charges_total"]) for b in billed] == [
        (str(_day(-2)), "0.00"), (str(_day(-1)), "0.00"), (str(_day(0)), "40.00")]
    assert (await api.call("GET", f"/v1/charges/{later['id']}"))["bill"] == done.bills[-1]


async def test_bad_charges_name_the_field_and_change_nothing(
        api: Api, db: asyncpg.Connection) -> None:
    names = await api.setup()
    account = names["account"]
    storage_plan = await license_plan(api, names, await counter(api), "peak")
    api_plan = await plan(api, names["api"], names["credit_type"])
    first = await attach(api, account, storage_plan)
    await attach(api, account, api_plan)
    ok = {"amount": "1", "description": "x", "day": "2024-07-05"}
    cases: list[tuple[int, dict[str, Any], str]] = [
        (422, ok, "account_plan"),  # two plans cover the day
        (422, {**ok, "day": "2024-09-05", "account_plan": first["id"]}, "account_plan"),
        (422, {**ok, "day": "2024-09-05"}, "day"),  # no plan covers it
        (422, {**ok, "account_plan": first["id"], "amount": "0.001"}, "amount"),
        (422, {**ok, "account_plan": first["id"], "amount": "0"}, "amount"),
        (422, {**ok, "account_plan": first["id"], "amount": "abc"}, "amount"),
        (422, {**ok, "account_plan": first["id"], "description": ""}, "description"),
        (422, {"amount": "1", "account_plan": first["id"]}, "description"),
        (422, {**ok, "account_plan": first["id"], "day": "2024-13-01"}, "day"),
        (422, {**ok, "account_plan": 0}, "account_plan"),
        (422, {**ok, "account_plan": first["id"], "bill": 1}, "bill"),
    ]
    for status, body, field in cases:
        problem = await _charge(api, account, expect=status, **body)
        assert problem["field"] == field, (body, problem)
    problem = await _charge(api, "no-such-account", expect=404, **ok)
    assert problem["field"] == "code"
    for path in ("/v1/charges/0", "/v1/charges/999999999999", "/v1/charges/x/void"):
        method = "POST" if path.endswith("void") else "GET"
        assert (await api.call(method, path, expect=404))["field"] == "id"
    assert await db.fetchval("SELECT count(*) FROM account_charges WHERE account_id = $1",
                             await account_id(db, account)) == 0
    made = await _charge(api, account, **{**ok, "account_plan": first["id"]})
    assert made["plan"] == storage_plan


async def test_charges_made_while_two_processes_bill_land_on_one_bill_each(
        api: Api, db: asyncpg.Connection, settings: Any, keys: dict[str, str]) -> None:
    """Charges for six closed days made while the bill run bills them in two processes: each
    one answered 201 is on exactly one bill, each refused (409: its day was billed first) on
    none, and each bill's total of charges is what is on it."""
    names = await api.setup()
    account = names["account"]
    await api.grant(account, "100")
    await daily_calls_plan(api, names, _day(-6))
    admin = {"Authorization": f"Bearer {keys['admin']}"}
    async with run_apps(settings, 2) as apps:
        clients = [a.client() for a in apps]
        try:
            async def charges(client: Any, n: int) -> list[Any]:
                return [await client.post(f"/v1/accounts/{account}/charges",
                                          headers={**admin, "Idempotency-Key": uuid.uuid4().hex},
                                          json={"amount": "1.25", "description": f"c{n}-{i}",
                                                "day": str(_day(-6 + i % 6))})
                        for i in range(24)]

            async def bill_runs(client: Any) -> list[Any]:
                runs = []
                await asyncio.sleep(0.15)  # (into the charges' stream, not before it)
                for _ in range(3):
                    runs.append(await client.post(
                        "/v1/bills/run", json={"through": str(_day(0)), "account": account},
                        headers={**admin, "Idempotency-Key": uuid.uuid4().hex}))
                    await asyncio.sleep(0.05)
                return runs
            made0, made1, runs0, runs1 = await asyncio.gather(
                charges(clients[0], 0), charges(clients[1], 1), bill_runs(clients[0]),
                bill_runs(clients[1]))
        finally:
            await asyncio.gather(*(c.aclose() for c in clients))
    answers = made0 + made1
    assert {a.status_code for a in answers} <= {201, 409}, [a.text for a in answers]
    assert [r.status_code for r in runs0 + runs1] == [200] * 6
    created = [a.json()["id"] for a in answers if a.status_code == 201]
    refused = [a.json() for a in answers if a.status_code == 409]
    assert all(p["field"] == "day" for p in refused)
    rows = await db.fetch("SELECT id, bill_id FROM account_charges WHERE account_id = $1",
                          await account_id(db, account))
    assert sorted(r["id"] for r in rows) == sorted(created)  # a refused one left nothing
    assert all(r["bill_id"] is not None for r in rows)  # every day is billed now
    bills = await db.fetch("SELECT b.id, b.charges_total, count(c.id) AS n FROM bills b "
                           "LEFT JOIN account_charges c ON c.bill_id = b.id "
                           "WHERE b.account_id = $1 GROUP BY b.id",
                           await account_id(db, account))
    assert len(bills) == 6
    assert all(b["charges_total"] == D("1.25") * b["n"] for b in bills)
    assert sum(b["n"] for b in bills) == len(created)


async def test_a_charge_waits_for_a_bill_run_under_way(api: Api, db: asyncpg.Connection) -> None:
    """A bill run holds the account's row lock from before it reads the period's charges
    until its bill is committed: a charge made or voided meanwhile waits for it (and then
    sees the bill)."""
    names = await api.setup()
    account = names["account"]
    await attach(api, account, await license_plan(api, names, await counter(api), "peak"))
    acct = await account_id(db, account)
    made = await _charge(api, account, amount="2", description="x", day="2024-07-01")
    async with db.transaction():  # as `bills._bill_account` does first
        await db.execute("SELECT 1 FROM accounts WHERE id = $1 FOR NO KEY UPDATE", acct)
        pending = asyncio.create_task(_charge(api, account, amount="3", description="y",
                                              day="2024-07-02"))
        voiding = asyncio.create_task(api.call("POST", f"/v1/charges/{made['id']}/void"))
        await asyncio.sleep(0.3)
        assert not pending.done() and not voiding.done()
    assert (await pending)["amount"] == "3.00"
    assert (await voiding)["voided_at"] is not None


async def test_a_charge_needs_an_idempotency_key_and_a_retry_bills_once(api: Api) -> None:
    names = await api.setup()
    account = names["account"]
    await attach(api, account, await license_plan(api, names, await counter(api), "peak"))
    body = {"amount": "7", "description": "set-up", "day": "2024-07-03"}
    problem = await api.call("POST", f"/v1/accounts/{account}/charges", expect=422, json=body)
    assert problem["field"] == "Idempotency-Key"
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = await api.call("POST", f"/v1/accounts/{account}/charges", expect=201, json=body,
                           headers=key)
    again = await api.call("POST", f"/v1/accounts/{account}/charges", expect=201, json=body,
                           headers=key)
    assert again == first
    listed = await api.call("GET", f"/v1/accounts/{account}/charges")
    assert [c["id"] for c in listed["data"]] == [first["id"]]
