"""Real-time drawdown through a conversion rate, and the recovery of a debit a crash left."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from decimal import Decimal as D
from typing import Any

import asyncpg
import pytest

from app.rating import drawdown
from tests.conftest import Api
from tests.test_rating_config import _code, fiat_usd, plan
from tests.test_rating_drawdown import aggregation, measure, storage_setup


async def _measure_at(api: Api, account: str, meter_code: str, ts: str,
                      **data: Any) -> dict[str, Any]:
    result: dict[str, Any] = await api.call("POST", "/v1/measurements", scope="runtime", json={
        "uid": uuid.uuid4().hex, "account": account, "meter": meter_code, "timestamp": ts,
        "data": data})
    return result


async def test_prices_in_usd_draw_custom_credits_at_the_rate_of_the_day(api: Api) -> None:
    # the balance is in whole credits (0 places); 1 credit = 0.01 USD, then 0.02 from the 16th
    names = await api.setup(credit_type="credits", decimal_places=0)
    usd = await fiat_usd(api)
    rates = f"/v1/credit-types/{names['credit_type']}/conversion-rates"
    for day, rate in (("2024-07-01", "0.01"), ("2024-07-16", "0.02")):
        await api.call("POST", rates, json={"fiat": usd, "effective": day, "rate": rate})
    await api.grant(names["account"], "1000")
    meter_code = await _storage_priced_in(api, names, usd)
    account = names["account"]
    # 10 GB at 0.05 USD = 0.50 USD, on the 10th at 0.01 USD a credit: 50 credits
    first = await _measure_at(api, account, meter_code, "2024-07-10T12:00:00Z", gb=10)
    assert [(d["amount"], d["credit_type"]) for d in first["debits"]] == \
        [("50", names["credit_type"])]
    # the same 0.50 USD on the 20th, after the rate went to 0.02: 25 credits
    second = await _measure_at(api, account, meter_code, "2024-07-20T12:00:00Z", gb=10)
    assert [d["amount"] for d in second["debits"]] == ["25"]
    # 0.015 USD = 0.75 credit: rounded once, half up, on the running total (75.75 -> 76)
    third = await _measure_at(api, account, meter_code, "2024-07-21T12:00:00Z", gb="0.3")
    assert [d["amount"] for d in third["debits"]] == ["1"]
    # the day before the change still uses the old rate, whatever the arrival order
    late = await _measure_at(api, account, meter_code, "2024-07-15T23:59:59Z", gb="0.2")
    assert [d["amount"] for d in late["debits"]] == ["1"]  # 0.01 USD = 1 credit: 76.75 -> 77
    assert D(await api.available(account)) == D(1000 - 77)
    bill = await api.call("GET", f"/v1/accounts/{account}/usage", params={"at": "2024-07-20"})
    [usage] = bill["plans"]
    assert usage["currency"] == usd and D(usage["total"]) == D("1.025")  # 20.5 GB at 0.05
    assert usage["credit_type"] == names["credit_type"] and D(usage["drawn"]) == 77


async def test_no_rate_for_the_day_rejects_the_measurement_and_stores_nothing(
        api: Api, db: asyncpg.Connection) -> None:
    names = await api.setup(credit_type="credits", decimal_places=0)
    usd = await fiat_usd(api)
    await api.call("POST", f"/v1/credit-types/{names['credit_type']}/conversion-rates",
                   json={"fiat": usd, "effective": "2024-07-16", "rate": "0.01"})
    meter_code = await _storage_priced_in(api, names, usd)
    uid = uuid.uuid4().hex
    body = await api.call("POST", "/v1/measurements", scope="runtime", expect=422, json={
        "uid": uid, "account": names["account"], "meter": meter_code,
        "timestamp": "2024-07-10T00:00:00Z", "data": {"gb": 1}})
    assert body["field"] == "account" and "conversion rate" in body["detail"]
    assert await db.fetchval("SELECT count(*) FROM measurements WHERE uid = $1", uid) == 0


async def test_in_a_batch_only_the_measurement_with_no_rate_for_its_day_is_refused(
        api: Api, db: asyncpg.Connection) -> None:
    """Rating refuses the batch together (one transaction), then rates it apart: by account,
    then one by one within the account that still fails."""
    names = await api.setup(credit_type="credits", decimal_places=0)
    usd = await fiat_usd(api)
    await api.call("POST", f"/v1/credit-types/{names['credit_type']}/conversion-rates",
                   json={"fiat": usd, "effective": "2024-07-16", "rate": "0.01"})
    meter_code = await _storage_priced_in(api, names, usd)
    other, other_meter, other_plan = await storage_setup(api)
    await api.call("POST", "/v1/pricings", expect=201, json={
        "plan": other_plan, "aggregation": await aggregation(api, other_meter, "gb", "SUM"),
        "start_date": await _plan_start(api, other["account"]), "type": "per_unit",
        "bands": [{"up_to": None, "price": "1"}]})
    sent = [{"uid": uuid.uuid4().hex, "account": names["account"], "meter": meter_code,
             "timestamp": ts, "data": {"gb": 1}}
            for ts in ("2024-07-10T00:00:00Z", "2024-07-20T00:00:00Z")]
    sent.append({"uid": uuid.uuid4().hex, "account": other["account"], "meter": other_meter,
                 "timestamp": datetime.now(UTC).isoformat(),
                 "data": {"gb": 2, "files": 1, "seconds": 1}})
    out = await api.call("POST", "/v1/measurements", scope="runtime",
                         json={"measurements": sent})
    assert [r["status"] for r in out["results"]] == ["rejected", "rated", "rated"], out
    assert out["results"][0]["error"]["field"] == "measurements.0.account"
    assert [d["amount"] for d in out["results"][1]["debits"]] == ["5"]  # 0.05 USD at 0.01
    assert [d["amount"] for d in out["results"][2]["debits"]] == ["2.00"]
    stored = await db.fetch("SELECT uid FROM measurements WHERE uid = ANY($1::text[])",
                            [m["uid"] for m in sent])
    assert {r["uid"] for r in stored} == {sent[1]["uid"], sent[2]["uid"]}
    assert D(await api.available(other["account"])) == D(1000 - 2)


async def _storage_priced_in(api: Api, names: dict[str, str], currency: str) -> str:
    """A plan in `currency` pricing SUM(gb) at 0.05 per unit from 2024-07-01, attached to the
    account from then on; returns the meter's code."""
    meter_code = await _meter(api)
    plan_code = await plan(api, names["storage"], currency)
    await api.call("POST", f"/v1/accounts/{names['account']}/plans", expect=201,
                   json={"plan": plan_code, "start_date": "2024-07-01"})
    await api.call("POST", "/v1/pricings", expect=201, json={
        "plan": plan_code, "aggregation": await aggregation(api, meter_code, "gb", "SUM"),
        "start_date": "2024-07-01", "type": "per_unit",
        "bands": [{"up_to": None, "price": "0.05"}]})
    return meter_code


async def _meter(api: Api) -> str:
    code = _code("m")
    await api.call("POST", "/v1/meters", expect=201, json={
        "code": code, "name": "storage", "data_fields": [{"code": "gb", "category": "measure"}]})
    return code


async def test_the_worker_sends_a_debit_a_crash_left_exactly_once(
        api: Api, app: Any, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    names, meter_code, plan_code = await storage_setup(api)
    await api.call("POST", "/v1/pricings", expect=201, json={
        "plan": plan_code, "aggregation": await aggregation(api, meter_code, "gb", "SUM"),
        "start_date": (await _plan_start(api, names["account"])), "type": "per_unit",
        "bands": [{"up_to": None, "price": "1.5"}]})

    async def crash_before_debit(ctx: Any, items: Any) -> None:
        return None  # the rating transaction committed; the process died before the debit

    monkeypatch.setattr(drawdown, "_send", crash_before_debit)
    result = await measure(api, names["account"], meter_code, gb=3, files=1, seconds=1)
    assert [d["amount"] for d in result["debits"]] == ["4.50"]
    monkeypatch.undo()
    assert D(await api.available(names["account"])) == D(1000)  # nothing reached the ledger
    # a retry of the measurement is a duplicate: it does not debit again either
    again = await api.call("POST", "/v1/measurements", scope="runtime", json={
        "uid": result["uid"], "account": names["account"], "meter": meter_code,
        "timestamp": "2024-07-10T00:00:00Z", "data": {"gb": 3, "files": 1, "seconds": 1}})
    assert again["status"] == "duplicate" and again["debits"] == []
    debit_uid = drawdown.debit_uid(result["uid"], int(result["debits"][0]["pricing"][1:]))
    account_id = await db.fetchval("SELECT id FROM accounts WHERE code = $1", names["account"])
    # two workers (two instances) find it at once: it is debited once, under its own uid
    sent = await asyncio.gather(drawdown.send_unsent(app.state.ctx, older_than_s=0),
                                drawdown.send_unsent(app.state.ctx, older_than_s=0))
    assert max(sent) >= 1
    assert D(await api.available(names["account"])) == D("995.5")
    assert await db.fetchval("SELECT count(*) FROM usage_events WHERE account_id = $1 AND uid = $2",
                             account_id, debit_uid) == 1
    pending = await db.fetchval(
        """SELECT count(*) FROM rated_debits d WHERE d.account_id = $1 AND NOT EXISTS
           (SELECT 1 FROM usage_events u WHERE u.account_id = d.account_id AND u.uid = d.uid)""",
        account_id)
    assert pending == 0
    await drawdown.send_unsent(app.state.ctx, older_than_s=0)  # a later pass: nothing more
    assert D(await api.available(names["account"])) == D("995.5")


async def _plan_start(api: Api, account: str) -> str:
    plans = await api.call("GET", f"/v1/accounts/{account}/plans")
    return str(plans["data"][0]["start_date"])


async def test_a_request_refused_for_no_rate_does_not_fail_requests_rated_with_it(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    # concurrent requests are rated in one transaction; a refused one is retried alone
    sizes: list[int] = []
    rate = drawdown._rate

    async def counting(ctx: Any, items: list[Any]) -> Any:
        sizes.append(len(items))
        return await rate(ctx, items)

    monkeypatch.setattr(drawdown, "_rate", counting)
    bad = await api.setup(credit_type="credits", decimal_places=0)
    usd = await fiat_usd(api)
    bad_meter = await _meter(api)
    bad_plan = await plan(api, bad["storage"], usd)
    await api.call("POST", f"/v1/accounts/{bad['account']}/plans", expect=201,
                   json={"plan": bad_plan, "start_date": "2024-07-01"})
    await api.call("POST", "/v1/pricings", expect=201, json={
        "plan": bad_plan, "aggregation": await aggregation(api, bad_meter, "gb", "SUM"),
        "start_date": "2024-07-01", "type": "per_unit", "bands": [{"up_to": None, "price": "1"}]})
    names, meter_code, plan_code = await storage_setup(api)
    await api.call("POST", "/v1/pricings", expect=201, json={
        "plan": plan_code, "aggregation": await aggregation(api, meter_code, "gb", "SUM"),
        "start_date": await _plan_start(api, names["account"]), "type": "per_unit",
        "bands": [{"up_to": None, "price": "1"}]})
    for _ in range(5):
        refused, rated = await asyncio.gather(
            _measure_at_expect(api, bad["account"], bad_meter, 422, gb=1),
            measure(api, names["account"], meter_code, gb=2, files=1, seconds=1))
        assert refused["field"] == "account"
        assert rated["status"] == "rated" and [d["amount"] for d in rated["debits"]] == ["2.00"]
    assert D(await api.available(names["account"])) == D(1000 - 10)
    assert max(sizes) == 2  # the two requests did share a transaction (then were split)


async def _measure_at_expect(api: Api, account: str, meter_code: str, expect: int,
                             **data: Any) -> dict[str, Any]:
    result: dict[str, Any] = await api.call("POST", "/v1/measurements", scope="runtime",
                                            expect=expect, json={
        "uid": uuid.uuid4().hex, "account": account, "meter": meter_code,
        "timestamp": "2024-07-10T00:00:00Z", "data": data})
    return result


async def test_bill_to_date_lists_a_pricing_that_ended_within_the_period(api: Api) -> None:
    # the price of storage changes on the 16th: one pricing to the 16th, another from it
    names = await api.setup()
    await api.grant(names["account"], "1000")
    meter_code = await _meter(api)
    plan_code = await plan(api, names["storage"], names["credit_type"])
    account = names["account"]
    await api.call("POST", f"/v1/accounts/{account}/plans", expect=201,
                   json={"plan": plan_code, "start_date": "2024-07-01"})
    gb = await aggregation(api, meter_code, "gb", "SUM")
    for start, end, price in (("2024-07-01", "2024-07-16", "1"), ("2024-07-16", None, "2")):
        await api.call("POST", "/v1/pricings", expect=201, json={
            "plan": plan_code, "aggregation": gb, "start_date": start, "end_date": end,
            "type": "per_unit", "bands": [{"up_to": None, "price": price}]})
    await _measure_at(api, account, meter_code, "2024-07-10T12:00:00Z", gb=3)  # 3 at 1
    await _measure_at(api, account, meter_code, "2024-07-20T12:00:00Z", gb=4)  # 4 at 2
    assert D(await api.available(account)) == 1000 - 11
    # after the first pricing ended, the period's bill still shows what it charged
    bill = await api.call("GET", f"/v1/accounts/{account}/usage", params={"at": "2024-07-25"})
    [usage] = bill["plans"]
    assert sorted((D(p["quantity"]), D(p["amount"])) for p in usage["pricings"]) == \
        [(D(3), D(3)), (D(4), D(8))]
    assert D(usage["total"]) == D(usage["drawn"]) == 11
