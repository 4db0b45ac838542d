"""Measurements stored unrated are rated once a plan or pricing covers them: exactly once,
promptly (by the worker), beside concurrent new measurements and across processes."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from typing import Any

import asyncpg
import httpx

from app.rating.drawdown import debit_uid
from app.settings import Settings
from tests.conftest import Api
from tests.procs import call_as, run_apps
from tests.test_rating_config import meter, plan
from tests.test_rating_drawdown import _now, aggregation, measure, month_start, price


async def _rated(api: Api, account: str, uid: str) -> bool:
    found = await api.call("GET", f"/v1/accounts/{account}/measurements/{uid}", scope="runtime")
    return bool(found["rated"])


async def _until_rated(api: Api, account: str, uids: list[str], seconds: float = 15) -> None:
    for _ in range(int(seconds / 0.1)):
        if all([await _rated(api, account, uid) for uid in uids]):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("not rated in time")


async def _drawn(api: Api, account: str) -> D:
    [usage] = (await api.call("GET", f"/v1/accounts/{account}/usage", scope="runtime"))["plans"]
    return D(usage["drawn"])


async def _setup(api: Api, grant: str = "100") -> tuple[dict[str, str], str, str]:
    names = await api.setup()
    await api.grant(names["account"], grant)
    meter_code = await meter(api, names["storage"])
    plan_code = await plan(api, names["storage"], names["credit_type"])
    return names, meter_code, plan_code


async def test_unrated_measurements_are_rated_once_a_plan_is_attached(
        api: Api, db: asyncpg.Connection) -> None:
    names, meter_code, plan_code = await _setup(api)
    account = names["account"]
    pricing_id = await price(api, plan_code, "tiered", [("5", "2"), (None, "1")],
                             aggregation=await aggregation(api, meter_code, "gb", "SUM"))
    uids = []
    for gb in (3, 4, 1):
        result = await measure(api, account, meter_code, gb=gb, files=1, seconds=1)
        assert result["status"] == "unrated"
        uids.append(result["uid"])
    assert not await _rated(api, account, uids[0])
    assert D(await api.available(account)) == 100
    await api.call("POST", f"/v1/accounts/{account}/plans", expect=201,
                   json={"plan": plan_code, "start_date": month_start()})
    await _until_rated(api, account, uids)
    # 8 GB tiered: 5 at 2 + 3 at 1 = 13
    assert D(await api.available(account)) == 87 and await _drawn(api, account) == 13
    await asyncio.sleep(1.5)  # three more worker passes rate nothing again
    assert D(await api.available(account)) == 87 and await _drawn(api, account) == 13
    account_id = await db.fetchval("SELECT id FROM accounts WHERE code = $1", account)
    # the three were rated in one pass: one debit for what they moved the charge by together
    [debit] = await db.fetch("SELECT uid, amount FROM rated_debits WHERE account_id = $1",
                             account_id)
    assert debit["amount"] == 13 and debit["uid"] in {debit_uid(u, pricing_id) for u in uids}
    # a replayed uid is a duplicate and changes nothing
    again = await api.call("POST", "/v1/measurements", scope="runtime", json={
        "uid": uids[1], "account": account, "meter": meter_code, "timestamp": _now(),
        "data": {"gb": 50, "files": 1, "seconds": 1}})
    assert again["status"] == "duplicate" and again["debits"] == []
    assert D(await api.available(account)) == 87


async def test_a_pricing_added_later_rates_what_the_plan_left_unrated(api: Api) -> None:
    names, meter_code, plan_code = await _setup(api)
    account = names["account"]
    await api.call("POST", f"/v1/accounts/{account}/plans", expect=201,
                   json={"plan": plan_code, "start_date": month_start()})
    first = await measure(api, account, meter_code, gb=10, files=1, seconds=1)
    assert first["status"] == "unrated"  # the plan prices nothing of this meter yet
    await price(api, plan_code, "per_unit", [(None, "0.5")],
                aggregation=await aggregation(api, meter_code, "gb", "LATEST"))
    await _until_rated(api, account, [first["uid"]])
    assert D(await api.available(account)) == 95
    # from now on it is rated on arrival, and a lower LATEST gives back
    second = await measure(api, account, meter_code, gb=4, files=1, seconds=1)
    assert second["status"] == "rated" and [c["amount"] for c in second["credits"]] == ["3.00"]
    assert D(await api.available(account)) == 98


async def test_a_billed_period_is_not_rated_later_an_unbilled_past_one_is(api: Api) -> None:
    """A period is open until the bill run closes it: a pricing added later rates the stored
    measurements of a past period not billed yet, and none of a billed one."""
    names, meter_code, plan_code = await _setup(api)
    billed, open_ = names["account"], f"{names['account']}-o"
    await api.call("POST", "/v1/accounts", expect=201, json={
        "code": open_, "name": "Open", "credit_type": names["credit_type"]})
    await api.grant(open_, "100")
    this_month = datetime.now(UTC).date().replace(day=1)
    last_month = (this_month - timedelta(days=2)).replace(day=1)
    old, new = {}, {}
    for account in (billed, open_):
        await api.call("POST", f"/v1/accounts/{account}/plans", expect=201,
                       json={"plan": plan_code, "start_date": str(last_month)})
        old[account] = await api.call("POST", "/v1/measurements", scope="runtime", json={
            "uid": uuid.uuid4().hex, "account": account, "meter": meter_code,
            "timestamp": f"{this_month - timedelta(days=2)}T12:00:00Z",
            "data": {"gb": 7, "files": 1, "seconds": 1}})
        new[account] = await measure(api, account, meter_code, gb=2, files=1, seconds=1)
        # the plan prices nothing of this meter yet
        assert old[account]["status"] == new[account]["status"] == "unrated"
    made = await api.call("POST", "/v1/bills/run", json={"through": str(this_month),
                                                         "account": billed})
    assert len(made["bills"]) == 1  # last month's, for the one account
    await price(api, plan_code, "per_unit", [(None, "1")], start_date=str(last_month),
                aggregation=await aggregation(api, meter_code, "gb", "SUM"))
    await _until_rated(api, billed, [new[billed]["uid"]])
    await _until_rated(api, open_, [new[open_]["uid"], old[open_]["uid"]])
    await asyncio.sleep(1.0)  # two more worker passes
    assert not await _rated(api, billed, old[billed]["uid"])  # billed: final
    assert D(await api.available(billed)) == 98
    assert D(await api.available(open_)) == 91


async def _until_no_request(db: asyncpg.Connection, account_id: int) -> None:
    for _ in range(100):
        if not await db.fetchval("SELECT count(*) FROM rerate_requests WHERE account_id = $1",
                                 account_id):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the re-rating request was not dropped")


async def test_a_new_pricing_reads_only_its_own_meters_measurements(
        api: Api, db: asyncpg.Connection) -> None:
    """A request reads the measurements of the meters its new pricings rate, and no other.
    The measurement of meter A planted here, unrated and older than A's pricing (which the
    share lock makes impossible), tells the two apart: a pricing for meter B leaves it, a
    request from before migration 018 (every meter) rates it."""
    names, meter_a, plan_code = await _setup(api)
    account = names["account"]
    await api.call("POST", f"/v1/accounts/{account}/plans", expect=201,
                   json={"plan": plan_code, "start_date": month_start()})
    await price(api, plan_code, "per_unit", [(None, "1")],
                aggregation=await aggregation(api, meter_a, "gb", "SUM"))
    account_id = await db.fetchval("SELECT id FROM accounts WHERE code = $1", account)
    await _until_no_request(db, account_id)  # the plan's and A's pricing's
    await db.execute(
        """INSERT INTO measurements (account_id, uid, meter_id, ts, data, rated, config_version)
           SELECT $1, 'planted', id, now(), '{"gb": "5", "files": "1", "seconds": "1"}', false,
                  -1 FROM meters WHERE code = $2""", account_id, meter_a)
    meter_b = await meter(api, names["storage"])
    await price(api, plan_code, "per_unit", [(None, "2")],
                aggregation=await aggregation(api, meter_b, "gb", "SUM"))
    b = await measure(api, account, meter_b, gb=1, files=1, seconds=1)
    assert b["status"] == "rated"
    await _until_no_request(db, account_id)  # B's pricing's request is worked off
    await asyncio.sleep(1.0)  # two more worker passes
    assert not await _rated(api, account, "planted")
    assert D(await api.available(account)) == 98
    await db.execute("INSERT INTO rerate_requests (account_id) VALUES ($1)", account_id)
    await _until_rated(api, account, ["planted"])
    assert D(await api.available(account)) == 93


async def test_an_unknown_measurement_is_a_404_naming_the_uid(api: Api) -> None:
    names = await api.setup()
    body = await api.call("GET", f"/v1/accounts/{names['account']}/measurements/nope",
                          scope="runtime", expect=404)
    assert body["field"] == "uid"


def _many(account: str, meter_code: str, prefix: str, count: int,
          gb: Callable[[int], int]) -> list[dict[str, Any]]:
    """`count` measurements `<prefix>-<i>` of `gb(i)` GB, timestamped now."""
    return [{"uid": f"{prefix}-{i}", "account": account, "meter": meter_code,
             "timestamp": _now(), "data": {"gb": gb(i), "files": 1, "seconds": 1}}
            for i in range(count)]


async def test_rerating_beside_new_measurements_in_two_processes_rates_each_once(
        api: Api, settings: Settings, keys: dict[str, str], db: asyncpg.Connection) -> None:
    names, meter_code, plan_code = await _setup(api, grant="100000")
    account = names["account"]
    await price(api, plan_code, "tiered", [("100", "1"), (None, "0.5")],
                aggregation=await aggregation(api, meter_code, "gb", "SUM"))
    await price(api, plan_code, "per_unit", [(None, "2")],
                aggregation=await aggregation(api, meter_code, "gb", "MAX"))
    stored = _many(account, meter_code, "old", 400, lambda i: i % 7)
    for start in range(0, len(stored), 200):
        batch = await api.call("POST", "/v1/measurements", scope="runtime",
                               json={"measurements": stored[start:start + 200]})
        assert batch["unrated"] == 200
    fresh = _many(account, meter_code, "new", 80, lambda i: 3 + i % 5)
    async with run_apps(settings, 2) as apps:
        clients = [httpx.AsyncClient(base_url=a.url, timeout=30) for a in apps]
        try:
            # the plan arrives; the workers of three processes re-rate while new measurements
            # for the same account and meter arrive through two of them
            await api.call("POST", f"/v1/accounts/{account}/plans", expect=201,
                           json={"plan": plan_code, "start_date": month_start()})
            await asyncio.gather(*(
                call_as(clients[i % 2], keys["runtime"], "POST", "/v1/measurements", json=item)
                for i, item in enumerate(fresh)))
            account_id = await db.fetchval("SELECT id FROM accounts WHERE code = $1", account)
            for _ in range(150):
                if not await db.fetchval("SELECT count(*) FROM measurements "
                                         "WHERE account_id = $1 AND NOT rated", account_id):
                    break
                await asyncio.sleep(0.1)
        finally:
            for client in clients:
                await client.aclose()
        assert not apps.tracebacks(), apps.tracebacks()
    values = [D(item["data"]["gb"]) for item in stored + fresh]
    total = sum(values, D(0))
    expected = 100 + (total - 100) * D("0.5") + 2 * max(values)
    assert await _drawn(api, account) == expected
    debits = await db.fetchval("SELECT sum(amount) FROM rated_debits WHERE account_id = $1",
                               account_id)
    ledger = await db.fetchval("SELECT -sum(amount) FROM ledger_entries WHERE account_id = $1 "
                               "AND kind IN ('debit', 'overage')", account_id)
    assert D(debits) == D(ledger) == expected
    states = await db.fetch("SELECT count FROM aggregation_states WHERE account_id = $1",
                            account_id)
    assert [r["count"] for r in states] == [len(values), len(values)]


async def test_rerates_running_at_once_rate_each_measurement_once(
        api: Api, app: Any, db: asyncpg.Connection) -> None:
    from app.rating.rerate import rerate_account

    names, meter_code, plan_code = await _setup(api, grant="100000")
    account = names["account"]
    await price(api, plan_code, "per_unit", [(None, "1")],
                aggregation=await aggregation(api, meter_code, "gb", "SUM"))
    stored = [{"uid": f"s-{i}", "account": account, "meter": meter_code, "timestamp": _now(),
               "data": {"gb": 1 + i % 3, "files": 1, "seconds": 1}} for i in range(300)]
    await api.call("POST", "/v1/measurements", scope="runtime", json={"measurements": stored})
    await api.call("POST", f"/v1/accounts/{account}/plans", expect=201,
                   json={"plan": plan_code, "start_date": month_start()})
    account_id = await db.fetchval("SELECT id FROM accounts WHERE code = $1", account)

    async def drain() -> int:  # small batches, four at a time (and the worker beside them)
        rated, more = 0, True
        while more:
            count, more = await rerate_account(app.state.ctx, account_id, limit=20)
            rated += count
        return rated

    counts = await asyncio.gather(*(drain() for _ in range(4)))
    assert sum(counts) <= 300
    await _until_rated(api, account, ["s-0", "s-299"])
    expected = sum((D(1 + i % 3) for i in range(300)), D(0))
    assert await _drawn(api, account) == expected
    assert await db.fetchval("SELECT count FROM aggregation_states WHERE account_id = $1",
                             account_id) == 300


async def test_a_request_is_dropped_once_a_pass_finds_nothing_more(
        api: Api, app: Any, db: asyncpg.Connection) -> None:
    from app.rating.rerate import rerate_pending

    names = await api.setup()
    account_id = await db.fetchval("SELECT id FROM accounts WHERE code = $1", names["account"])
    await db.execute("INSERT INTO rerate_requests (account_id) VALUES ($1)", account_id)
    await rerate_pending(app.state.ctx)
    assert await db.fetchval("SELECT count(*) FROM rerate_requests WHERE account_id = $1",
                             account_id) == 0


async def _state_counts(db: asyncpg.Connection, account_id: int) -> dict[int, int]:
    rows = await db.fetch("SELECT pricing_id, sum(count) AS n FROM aggregation_states "
                          "WHERE account_id = $1 GROUP BY pricing_id", account_id)
    return {r["pricing_id"]: int(r["n"]) for r in rows}


async def _until_counted(db: asyncpg.Connection, account_id: int, expected: dict[int, int],
                         seconds: float = 15) -> None:
    for _ in range(int(seconds / 0.1)):
        if await _state_counts(db, account_id) == expected:
            return
        await asyncio.sleep(0.1)
    assert await _state_counts(db, account_id) == expected


async def _until_available(api: Api, account: str, expected: D, seconds: float = 10) -> None:
    """A re-rating commits its states first and sends their debits after (rerate.py:
    `send_rated`): the balance follows the counts a moment later."""
    for _ in range(int(seconds / 0.1)):
        if D(await api.available(account)) == expected:
            return
        await asyncio.sleep(0.1)
    assert D(await api.available(account)) == expected


async def _attached(api: Api, db: asyncpg.Connection, grant: str = "100"
                    ) -> tuple[dict[str, str], int, str, str, int]:
    """An account on a plan that prices SUM(gb) at 1 per GB from the start of the month:
    (names, account id, meter, plan, that pricing's id)."""
    names, meter_code, plan_code = await _setup(api, grant)
    account_id = await db.fetchval("SELECT id FROM accounts WHERE code = $1", names["account"])
    pricing_id = await price(api, plan_code, "per_unit", [(None, "1")],
                             aggregation=await aggregation(api, meter_code, "gb", "SUM"))
    await api.call("POST", f"/v1/accounts/{names['account']}/plans", expect=201,
                   json={"plan": plan_code, "start_date": month_start()})
    return names, account_id, meter_code, plan_code, pricing_id


async def test_a_pricing_added_later_rates_what_other_pricings_rated(
        api: Api, db: asyncpg.Connection) -> None:
    names, account_id, meter_code, plan_code, storage = await _attached(api, db)
    account = names["account"]
    for gb in (3, 4):
        assert (await measure(api, account, meter_code, gb=gb, files=1, seconds=1))[
            "status"] == "rated"
    assert await _drawn(api, account) == 7
    # a second price on the same meter, from the start of the period: it covers those two
    peak = await price(api, plan_code, "per_unit", [(None, "2")],
                       aggregation=await aggregation(api, meter_code, "gb", "MAX"))
    await _until_counted(db, account_id, {storage: 2, peak: 2})
    assert await _drawn(api, account) == 7 + 2 * 4
    await _until_available(api, account, D(100 - 15))
    # from now on both rate on arrival, each measurement once
    assert (await measure(api, account, meter_code, gb=5, files=1, seconds=1))[
        "status"] == "rated"
    await asyncio.sleep(0.5)  # more worker passes take nothing again
    assert await _state_counts(db, account_id) == {storage: 3, peak: 3}
    assert await _drawn(api, account) == 12 + 2 * 5
    [usage] = (await api.call("GET", f"/v1/accounts/{account}/usage", scope="runtime"))["plans"]
    assert sorted(D(p["quantity"]) for p in usage["pricings"]) == [5, 12]


async def test_a_plan_attached_later_rates_what_another_plan_rated(
        api: Api, db: asyncpg.Connection) -> None:
    names, account_id, meter_code, plan_code, first = await _attached(api, db)
    account = names["account"]
    rated = [await measure(api, account, meter_code, gb=gb, files=2, seconds=1)
             for gb in (1, 2, 6)]
    assert [r["status"] for r in rated] == ["rated"] * 3
    # a plan for another product that prices the same meter's files, backdated
    product = f"support-{uuid.uuid4().hex[:8]}"
    await api.call("POST", "/v1/products", expect=201, json={"code": product, "name": product})
    other = await plan(api, product, names["credit_type"])
    files = await price(api, other, "per_unit", [(None, "0.5")],
                        aggregation=await aggregation(api, meter_code, "files", "SUM"))
    await api.call("POST", f"/v1/accounts/{account}/plans", expect=201,
                   json={"plan": other, "start_date": month_start()})
    await _until_counted(db, account_id, {first: 3, files: 3})
    await _until_available(api, account, D(100 - 9 - 3))
    drawn = {p["plan"]: D(p["drawn"]) for p in
             (await api.call("GET", f"/v1/accounts/{account}/usage", scope="runtime"))["plans"]}
    assert drawn == {plan_code: 9, other: 3}


async def test_a_pricing_added_beside_new_measurements_in_two_processes_counts_each_once(
        api: Api, settings: Settings, keys: dict[str, str], db: asyncpg.Connection) -> None:
    names, account_id, meter_code, plan_code, total = await _attached(api, db, grant="100000")
    account = names["account"]
    stored = _many(account, meter_code, "old", 300, lambda i: 1 + i % 4)
    batch = await api.call("POST", "/v1/measurements", scope="runtime",
                           json={"measurements": stored})
    assert batch["rated"] == 300
    fresh = _many(account, meter_code, "new", 120, lambda i: 1 + i % 3)
    async with run_apps(settings, 2) as apps:
        clients = [httpx.AsyncClient(base_url=a.url, timeout=30) for a in apps]
        try:
            # a tiered price on the same meter arrives while new measurements come in through
            # both processes, and the workers of three processes re-rate
            async def add_pricing() -> int:
                await asyncio.sleep(0.05)
                return await price(api, plan_code, "tiered", [("200", "0.5"), (None, "0.25")],
                                   aggregation=await aggregation(api, meter_code, "gb", "SUM"))

            tiered, *_ = await asyncio.gather(add_pricing(), *(
                call_as(clients[i % 2], keys["runtime"], "POST", "/v1/measurements", json=item)
                for i, item in enumerate(fresh)))
            await _until_counted(db, account_id, {total: 420, tiered: 420}, seconds=30)
        finally:
            for client in clients:
                await client.aclose()
        assert not apps.tracebacks(), apps.tracebacks()
    gb = sum((D(item["data"]["gb"]) for item in stored + fresh), D(0))
    expected = gb + 200 * D("0.5") + (gb - 200) * D("0.25")
    assert await _drawn(api, account) == expected
    for _ in range(100):  # the last debits reach the ledger through the journal's group commit
        ledger = await db.fetchval("SELECT -sum(amount) FROM ledger_entries "
                                   "WHERE account_id = $1 AND kind IN ('debit', 'overage')",
                                   account_id)
        if D(ledger) == expected:
            break
        await asyncio.sleep(0.1)
    assert D(ledger) == expected


async def test_a_plan_attached_while_a_rating_reads_the_pricings_waits_for_it(
        api: Api, app: Any, db: asyncpg.Connection) -> None:
    """The rating transaction share-locks the configuration version it read, so a plan cannot
    commit between that read and the measurement's commit, where the re-rating it requests
    would miss the measurement (stored at the older version)."""
    from app.rating import repository as repo

    names, meter_code, plan_code = await _setup(api)
    account = names["account"]
    await price(api, plan_code, "per_unit", [(None, "1")],
                aggregation=await aggregation(api, meter_code, "gb", "SUM"))
    account_id = await db.fetchval("SELECT id FROM accounts WHERE code = $1", account)
    meter_id = await db.fetchval("SELECT id FROM meters WHERE code = $1", meter_code)
    now = datetime.now(UTC)
    async with app.state.ctx.pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        found, version = await repo.active_pricings_many(conn, [(account_id, meter_id,
                                                                 now.date())])
        assert found == {}  # no plan yet: the measurement is stored unrated
        attach = asyncio.create_task(api.call(
            "POST", f"/v1/accounts/{account}/plans", expect=201,
            json={"plan": plan_code, "start_date": month_start()}))
        await asyncio.sleep(1.0)
        assert not attach.done()  # waits for the rating transaction
        await repo.insert_measurements(conn, [(account_id, "raced", meter_id, now,
                                               '{"gb": "4", "files": "1", "seconds": "1"}',
                                               False, version)])
        await transaction.commit()
    await attach
    await _until_rated(api, account, ["raced"])
    assert await _drawn(api, account) == 4


async def test_a_rating_that_waited_for_a_plan_reads_the_plan(
        api: Api, app: Any, db: asyncpg.Connection, settings: Settings) -> None:
    """The share lock on the version waits for a plan being attached; the pricings must then
    be read after that commit too, not from the snapshot taken before the wait."""
    from app.rating import repository as repo

    names, meter_code, plan_code = await _setup(api)
    pricing_id = await price(api, plan_code, "per_unit", [(None, "1")],
                             aggregation=await aggregation(api, meter_code, "gb", "SUM"))
    account_id = await db.fetchval("SELECT id FROM accounts WHERE code = $1", names["account"])
    meter_id = await db.fetchval("SELECT id FROM meters WHERE code = $1", meter_code)
    plan_id = await db.fetchval("SELECT id FROM plans WHERE code = $1", plan_code)
    attaching = await asyncpg.connect(settings.database_url)
    try:
        transaction = attaching.transaction()
        await transaction.start()
        version = await attaching.fetchval(
            "INSERT INTO account_plans (account_id, plan_id, start_date, billing_anchor) "
            "VALUES ($1, $2, $3, $3) RETURNING config_version", account_id, plan_id,
            datetime.now(UTC).date().replace(day=1))
        async with app.state.ctx.pool.acquire() as conn, conn.transaction():
            reading = asyncio.create_task(repo.active_pricings_many(
                conn, [(account_id, meter_id, datetime.now(UTC).date())]))
            await asyncio.sleep(0.5)
            assert not reading.done()  # waits for the plan's transaction
            await transaction.commit()
            found, read_at = await reading
    finally:
        await attaching.close()
    assert read_at >= version
    assert [row["id"] for rows in found.values() for row in rows] == [pricing_id]
