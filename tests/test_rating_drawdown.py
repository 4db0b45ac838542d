"""Real-time drawdown from measurements, bill-to-date, and bad measurements."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from typing import Any

import asyncpg

from app.rating import repository as repo
from app.rating.drawdown import UnsentCursor, send_unsent
from app.rating.schemas import MAX_MEASUREMENTS
from tests.conftest import Api
from tests.test_rating_config import _code, meter, plan


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def month_start() -> str:
    return datetime.now(UTC).date().replace(day=1).isoformat()


async def aggregation(api: Api, meter_code: str, target: str, function: str,
                      **extra: Any) -> str:
    code = _code("agg")
    await api.call("POST", "/v1/aggregations", expect=201, json={
        "code": code, "name": code, "meter": meter_code, "target_field": target,
        "function": function, **extra})
    return code


async def price(api: Api, plan_code: str, kind: str, bands: list[tuple[str | None, str]],
                **extra: Any) -> int:
    made = await api.call("POST", "/v1/pricings", expect=201, json={
        "plan": plan_code, "start_date": month_start(), "type": kind,
        "bands": [{"up_to": u, "price": p} for u, p in bands], **extra})
    return int(made["id"])


async def measure(api: Api, account: str, meter_code: str, expect: int = 200,
                  **data: Any) -> dict[str, Any]:
    result: dict[str, Any] = await api.call("POST", "/v1/measurements", scope="runtime",
                                            expect=expect, json={
        "uid": uuid.uuid4().hex, "account": account, "meter": meter_code, "timestamp": _now(),
        "data": data})
    return result


async def storage_setup(api: Api, standing_charge: str = "0") -> tuple[dict[str, str], str, str]:
    names = await api.setup()
    await api.grant(names["account"], "1000")
    meter_code = await meter(api, names["storage"])
    plan_code = await plan(api, names["storage"], names["credit_type"],
                           standing_charge=standing_charge)
    attached = await api.call("POST", f"/v1/accounts/{names['account']}/plans", expect=201,
                              json={"plan": plan_code, "start_date": month_start()})
    # attaching draws the period's standing charge at once
    assert [D(d["amount"]) for d in attached["debits"]] == \
        ([D(standing_charge)] if D(standing_charge) else [])
    return names, meter_code, plan_code


async def test_worked_example_storage_files_addon_and_standing_charge(api: Api) -> None:
    names, meter_code, plan_code = await storage_setup(api, standing_charge="10")
    await price(api, plan_code, "tiered", [("50", "0.50"), (None, "0.40")],
                aggregation=await aggregation(api, meter_code, "gb", "SUM"))
    await price(api, plan_code, "per_unit", [(None, "0.10")],
                aggregation=await aggregation(api, meter_code, "files", "SUM"))
    await price(api, plan_code, "stair_step", [("5", "2.00"), (None, "5.00")],
                aggregation=await aggregation(api, meter_code, "per_file", "MEAN"))
    first = await measure(api, names["account"], meter_code, gb=50, files=8, seconds=29)
    assert first["status"] == "rated"
    # 50 GB at 0.50 + 8 files at 0.10 + 3.625 s per file -> the 2.00 step
    assert sorted(D(d["amount"]) for d in first["debits"]) == [D("0.80"), D(2), D(25)]
    second = await measure(api, names["account"], meter_code, gb=20, files=2, seconds=31)
    # 20 GB more at 0.40; 2 files; mean per file (3.625 + 15.5) / 2 crosses 5 s: 3.00 more
    assert sorted(D(d["amount"]) for d in second["debits"]) == [D("0.20"), D(3), D(8)]
    # the standing charge 10 was drawn when the plan was attached
    assert D(await api.available(names["account"])) == D(1000) - D("49.00")
    bill = await api.call("GET", f"/v1/accounts/{names['account']}/usage", scope="runtime")
    [usage] = bill["plans"]
    assert usage["standing_charge"] == "10" and D(usage["total"]) == D(49)
    assert D(usage["drawn"]) == D(49) and D(usage["standing_charge_drawn"]) == D(10)
    amounts = sorted(D(p["amount"]) for p in usage["pricings"])
    assert amounts == [D(1), D(5), D(33)]
    storage = next(p for p in usage["pricings"] if D(p["amount"]) == 33)
    assert [(b["units"], b["amount"]) for b in storage["bands"]] == [("50", "25.00"),
                                                                     ("20", "8.00")]


async def test_division_by_zero_leaves_the_derived_field_absent(api: Api) -> None:
    names, meter_code, plan_code = await storage_setup(api)
    await price(api, plan_code, "per_unit", [(None, "1")],
                aggregation=await aggregation(api, meter_code, "per_file", "SUM"))
    result = await measure(api, names["account"], meter_code, gb=1, files=0, seconds=5)
    assert result["status"] == "rated" and result["debits"] == []


async def test_measurement_without_a_plan_is_stored_unrated(api: Api,
                                                            db: asyncpg.Connection) -> None:
    names = await api.setup()
    meter_code = await meter(api)
    result = await measure(api, names["account"], meter_code, gb=1, files=1, seconds=1)
    assert result["status"] == "unrated"
    assert await db.fetchval("SELECT rated FROM measurements WHERE uid = $1",
                             result["uid"]) is False


async def test_a_repeated_uid_changes_nothing(api: Api) -> None:
    names, meter_code, plan_code = await storage_setup(api)
    await price(api, plan_code, "per_unit", [(None, "1")],
                aggregation=await aggregation(api, meter_code, "gb", "SUM"))
    body = {"uid": "same-1", "account": names["account"], "meter": meter_code,
            "timestamp": _now(), "data": {"gb": 3, "files": 1, "seconds": 1}}
    first = await api.call("POST", "/v1/measurements", scope="runtime", json=body)
    again = await api.call("POST", "/v1/measurements", scope="runtime",
                           json={"measurements": [body, body]})
    assert first["status"] == "rated" and again["duplicates"] == 2
    assert D(await api.available(names["account"])) == D(997)


async def test_bad_measurements_name_the_field(api: Api) -> None:
    names = await api.setup()
    meter_code = await meter(api)
    base = {"uid": "u1", "account": names["account"], "meter": meter_code, "timestamp": _now()}
    cases = [({"gb": 1, "files": 1}, "data.seconds"),
             ({"gb": "lots", "files": 1, "seconds": 1}, "data.gb"),
             ({"gb": True, "files": 1, "seconds": 1}, "data.gb"),
             ({"gb": 1, "files": 1, "seconds": 1, "colour": "x"}, "data.colour"),
             ({"gb": 1, "files": 1, "seconds": 1, "region": 5}, "data.region"),
             # exponents no arithmetic can follow (the first was a 500)
             ({"gb": "1e999999999", "files": 1, "seconds": 1}, "data.gb"),
             ({"gb": "1e-999999999", "files": 1, "seconds": 1}, "data.gb"),
             ({"gb": 1, "files": "1e-19", "seconds": 1}, "data.files"),
             # text Decimal reads that is not a decimal as documented
             ({"gb": " 1", "files": 1, "seconds": 1}, "data.gb"),
             ({"gb": "1_000", "files": 1, "seconds": 1}, "data.gb")]
    for data, field in cases:
        body = await api.call("POST", "/v1/measurements", scope="runtime", expect=422,
                              json={**base, "data": data})
        assert body["field"] == field, body
    body = await api.call("POST", "/v1/measurements", scope="runtime", expect=422,
                          json={**base, "meter": "no-such-meter", "data": {}})
    assert body["field"] == "meter"
    batch = await api.call("POST", "/v1/measurements", scope="runtime", json={"measurements": [
        {**base, "data": {"gb": 1, "files": 1, "seconds": 1}},
        {**base, "uid": "u2", "x": 1, "data": {"gb": 1, "files": 1, "seconds": 1}}]})
    assert batch["unrated"] == 1 and batch["rejected"] == 1
    assert batch["results"][1]["error"]["field"] == "measurements.1.x"


async def test_a_bad_batch_envelope_names_the_field_and_stores_nothing(
        api: Api, db: asyncpg.Connection) -> None:
    names = await api.setup()
    meter_code = await meter(api)

    def one() -> dict[str, Any]:
        return {"uid": uuid.uuid4().hex, "account": names["account"], "meter": meter_code,
                "timestamp": _now(), "data": {"gb": 1, "files": 1, "seconds": 1}}

    before = await db.fetchval("SELECT count(*) FROM measurements")
    cases = [({"measurements": [one() for _ in range(MAX_MEASUREMENTS + 1)]}, "measurements"),
             ({"measurements": []}, "measurements"),
             ({"measurements": one()}, "measurements"),
             ({"measurements": [one()], "surprise": 1}, "surprise")]
    for body, field in cases:
        problem = await api.call("POST", "/v1/measurements", scope="runtime", expect=422,
                                 json=body)
        assert problem["field"] == field, problem
    assert await db.fetchval("SELECT count(*) FROM measurements") == before
    full = await api.call("POST", "/v1/measurements", scope="runtime",
                          json={"measurements": [one() for _ in range(MAX_MEASUREMENTS)]})
    assert full["unrated"] == MAX_MEASUREMENTS  # the limit itself is taken


async def test_a_rated_debit_lost_in_a_crash_is_sent_by_the_worker(
        api: Api, app: Any, db: asyncpg.Connection) -> None:
    from app.rating.drawdown import send_unsent

    names = await api.setup()
    await api.grant(names["account"], "100")
    account_id = await db.fetchval("SELECT id FROM accounts WHERE code = $1", names["account"])
    # what a process leaves when it dies between the rating commit and the debit
    await db.execute(
        """INSERT INTO rated_debits (account_id, uid, product_code, credit_type, amount, ts,
                                     created_at)
           VALUES ($1, 'r1:lost', $2, $3, 7, now(), now() - interval '1 minute')""",
        account_id, names["storage"], names["credit_type"])
    assert await send_unsent(app.state.ctx) >= 1
    assert D(await api.available(names["account"])) == D(93)
    assert await send_unsent(app.state.ctx, limit=10_000) == 0 or \
        D(await api.available(names["account"])) == D(93)


async def test_the_scan_for_unsent_debits_goes_on_from_its_cursor_never_past_a_running_transaction(
        api: Api, app: Any, db: asyncpg.Connection, database_url: str) -> None:
    """Each pass reads only rated debits after its cursor, which stops short of any
    transaction still running: its rows, once committed, carry its start as created_at."""
    names = await api.setup()
    await api.grant(names["account"], "100")
    account_id = await db.fetchval("SELECT id FROM accounts WHERE code = $1", names["account"])
    ctx, cursor = app.state.ctx, UnsentCursor()
    await send_unsent(ctx, older_than_s=0, cursor=cursor)  # the first pass: the last 7 days
    slow = await asyncpg.connect(database_url)
    try:
        transaction = slow.transaction()
        await transaction.start()
        started = await slow.fetchval("SELECT now()")
        await slow.execute(
            """INSERT INTO rated_debits (account_id, uid, product_code, credit_type, amount, ts)
               VALUES ($1, 'r1:slow', $2, $3, 7, now())""",
            account_id, names["storage"], names["credit_type"])
        assert await send_unsent(ctx, older_than_s=0, cursor=cursor) == 0
        assert cursor.after is not None and cursor.after[0] <= started
        await transaction.commit()
    finally:
        await slow.close()
    assert await send_unsent(ctx, older_than_s=0, cursor=cursor) == 1
    assert D(await api.available(names["account"])) == D(93)
    assert cursor.after is not None and cursor.after[0] > started
    assert await send_unsent(ctx, older_than_s=0, cursor=cursor) == 0


async def test_a_restarted_worker_goes_on_from_the_stored_cursor_not_from_7_days_back(
        api: Api, app: Any, db: asyncpg.Connection) -> None:
    """The workers' cursor is kept in Postgres: a process's first pass starts where the
    furthest process got to. A row behind that position (which cannot happen but is planted
    here to tell the two starts apart) is read by a scan from 7 days back, not by a restart."""
    names = await api.setup()
    await api.grant(names["account"], "100")
    account_id = await db.fetchval("SELECT id FROM accounts WHERE code = $1", names["account"])
    ctx = app.state.ctx
    first = UnsentCursor(shared=True)
    await send_unsent(ctx, older_than_s=0, cursor=first)
    assert first.after is not None
    stored = await db.fetchrow("SELECT created_at, account_id, uid FROM worker_cursors "
                               "WHERE name = 'rated_debits.unsent'")
    assert stored is not None and stored["created_at"] >= first.after[0]

    planted = f"r1:{_code('behind')}"
    await db.execute(
        """INSERT INTO rated_debits (account_id, uid, product_code, credit_type, amount, ts,
                                     created_at)
           VALUES ($1, $2, $3, $4, 7, now(), now() - interval '1 minute')""",
        account_id, planted, names["storage"], names["credit_type"])

    async def sent() -> bool:
        return bool(await db.fetchval(
            "SELECT count(*) FROM usage_events WHERE account_id = $1 AND uid = $2",
            account_id, planted))

    restarted = UnsentCursor(shared=True)
    await send_unsent(ctx, older_than_s=0, cursor=restarted)
    assert not await sent()
    assert restarted.after is not None and restarted.after[0] >= stored["created_at"]
    # a position behind the stored one does not move it back
    await repo.store_cursor(db, "rated_debits.unsent", (first.after[0] - timedelta(days=1), 0, ""))
    again = await db.fetchval("SELECT created_at FROM worker_cursors "
                              "WHERE name = 'rated_debits.unsent'")
    assert again >= stored["created_at"]
    # a cursor of its own (not shared) reads the last 7 days and finds it
    assert await send_unsent(ctx, older_than_s=0, cursor=UnsentCursor()) >= 1
    assert await sent()
    assert D(await api.available(names["account"])) == D(93)


async def test_license_counter_raised_and_lowered_mid_month(api: Api) -> None:
    names = await api.setup()
    counter = _code("licenses")
    await api.call("POST", "/v1/counters", expect=201,
                   json={"code": counter, "name": "Dev licenses", "unit": "licenses"})
    plan_code = await plan(api, names["storage"], names["credit_type"])
    await api.call("POST", f"/v1/accounts/{names['account']}/plans", expect=201,
                   json={"plan": plan_code, "start_date": "2024-07-01"})
    for mode in ("prorate", "peak"):
        await api.call("POST", "/v1/pricings", expect=201, json={
            "plan": plan_code, "counter": counter, "type": "per_unit", "counter_mode": mode,
            "bands": [{"up_to": None, "price": "31"}],
            "start_date": "2024-07-01" if mode == "prorate" else "2024-08-01",
            "end_date": "2024-08-01" if mode == "prorate" else None})
    path = f"/v1/accounts/{names['account']}/counter-adjustments"
    for day, level in (("2024-07-01", 10), ("2024-07-16", 20), ("2024-07-26", 5)):
        await api.call("POST", path, json={"counter": counter, "effective": day, "level": level})
    bill = await api.call("GET", f"/v1/accounts/{names['account']}/usage",
                          params={"at": "2024-07-20"})
    [usage] = bill["plans"][0]["pricings"]
    # 10 licenses for 15 days, 20 for 10, 5 for 6, at 31 a month: 1 a license-day
    assert D(usage["amount"]) == 150 + 200 + 30 and usage["quantity"] == "20"
    bill = await api.call("GET", f"/v1/accounts/{names['account']}/usage",
                          params={"at": "2024-08-20"})
    [usage] = bill["plans"][0]["pricings"]
    assert D(usage["amount"]) == 5 * 31  # at the peak: 5 all of August


async def test_a_measure_of_36_digits_is_aggregated_and_priced_exactly(api: Api) -> None:
    """The longest numbers a request may carry (18 digits each side of the point) are summed
    and priced without rounding: the default Decimal precision of 28 digits rounded them."""
    names, meter_code, plan_code = await storage_setup(api)
    await price(api, plan_code, "per_unit", [(None, "0.000000000007")],
                aggregation=await aggregation(api, meter_code, "gb", "SUM"))
    values = ["123456789012345678.123456789012345678", "987654321098765432.987654321098765432"]
    for value in values:
        assert (await measure(api, names["account"], meter_code, gb=value, files=1,
                              seconds=1))["status"] == "rated"
    bill = await api.call("GET", f"/v1/accounts/{names['account']}/usage", scope="runtime")
    [pricing] = [p for p in bill["plans"][0]["pricings"] if p["aggregation"]]
    # (written out by hand: the test's own arithmetic would round at 28 digits too)
    assert pricing["quantity"] == "1111111110111111111.111111110111111110"
    assert pricing["amount"] == "7777777.770777777777777777770777777770"
