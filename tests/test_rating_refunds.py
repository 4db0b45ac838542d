"""Charges that go down are credited back mid-period: the period's own debits are reversed,
newest first, overage before balances; exactly, once, and across processes."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from typing import Any

import asyncpg
import httpx

from app.rating.drawdown import credit_uid, debit_uid
from app.rating.giveback import settle_unsettled
from app.settings import Settings
from tests.conftest import Api
from tests.procs import call_as, run_apps
from tests.test_rating_config import meter, plan
from tests.test_rating_drawdown import aggregation, month_start, price
from tests.webhook_receiver import eventually


def _ts(step: int) -> str:
    """Increasing timestamps just before now (LATEST goes by timestamp)."""
    at = datetime.now(UTC) - timedelta(milliseconds=100 * (1000 - step))
    at = max(at, datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0))
    return at.isoformat().replace("+00:00", "Z")


class Setup:
    def __init__(self, api: Api, names: dict[str, str], meter_code: str, plan_code: str) -> None:
        self.api, self.names, self.meter, self.plan = api, names, meter_code, plan_code
        self.account = names["account"]
        self.step = 0

    async def price(self, function: str, kind: str, bands: list[tuple[str | None, str]]) -> int:
        return await price(self.api, self.plan, kind, bands,
                           aggregation=await aggregation(self.api, self.meter, "gb", function))

    async def measure(self, gb: str | int, uid: str | None = None) -> dict[str, Any]:
        self.step += 1
        result: dict[str, Any] = await self.api.call(
            "POST", "/v1/measurements", scope="runtime", json={
                "uid": uid or uuid.uuid4().hex, "account": self.account, "meter": self.meter,
                "timestamp": _ts(self.step), "data": {"gb": gb, "files": 1, "seconds": 1}})
        return result

    async def live(self) -> tuple[D, D]:
        [total] = (await self.api.live(self.account))["totals"]
        return D(total["available"]), D(total["overage"])

    async def bill(self) -> dict[str, Any]:
        found = await self.api.call("GET", f"/v1/accounts/{self.account}/usage", scope="runtime")
        [usage] = found["plans"]
        return dict(usage)


async def _setup(api: Api, grants: tuple[tuple[str, int], ...] = (("1000", 100),)) -> Setup:
    names = await api.setup()
    for amount, priority in grants:
        await api.grant(names["account"], amount, priority=priority)
    meter_code = await meter(api, names["storage"])
    plan_code = await plan(api, names["storage"], names["credit_type"])
    await api.call("POST", f"/v1/accounts/{names['account']}/plans", expect=201,
                   json={"plan": plan_code, "start_date": month_start()})
    return Setup(api, names, meter_code, plan_code)


async def _entries(db: asyncpg.Connection, uid: str) -> list[tuple[str, D]]:
    rows = await db.fetch("SELECT kind, amount FROM ledger_entries WHERE usage_uid = $1 "
                          "ORDER BY id", uid)
    return [(r["kind"], D(r["amount"])) for r in rows]


async def test_latest_going_down_credits_the_difference_back(api: Api,
                                                              db: asyncpg.Connection) -> None:
    s = await _setup(api)
    pricing = await s.price("LATEST", "per_unit", [(None, "1.50")])
    first = await s.measure(10)
    assert [d["amount"] for d in first["debits"]] == ["15.00"] and first["credits"] == []
    second = await s.measure(4)
    # 4 GB at 1.50 = 6.00: 9.00 of the 15.00 comes back
    assert second["debits"] == [] and [c["amount"] for c in second["credits"]] == ["9.00"]
    assert await s.live() == (D(994), D(0))
    assert await _entries(db, credit_uid(second["uid"], pricing)) == [("adjustment", D(9))]
    usage = await s.bill()
    assert D(usage["drawn"]) == D(usage["total"]) == D(6)


async def test_min_and_mean_going_down_are_credited_back(api: Api) -> None:
    s = await _setup(api)
    await s.price("MIN", "per_unit", [(None, "1")])
    await s.price("MEAN", "per_unit", [(None, "0.10")])
    await s.measure(10)  # MIN 10 -> 10.00, MEAN 10 -> 1.00
    assert await s.live() == (D(989), D(0))
    third = await s.measure(2)  # MIN 2 -> 2.00 (8.00 back), MEAN 6 -> 0.60 (0.40 back)
    assert sorted(D(c["amount"]) for c in third["credits"]) == [D("0.40"), D(8)]
    assert await s.live() == (D("997.40"), D(0))
    fourth = await s.measure(30)  # MIN stays 2; MEAN 14 -> 1.40: 0.80 more
    assert [d["amount"] for d in fourth["debits"]] == ["0.80"] and fourth["credits"] == []
    usage = await s.bill()
    assert D(usage["drawn"]) == D(usage["total"]) == D("3.40")
    assert await s.live() == (D("996.60"), D(0))


async def _batch(s: Setup, *gbs: int) -> list[dict[str, Any]]:
    items = []
    for gb in gbs:
        s.step += 1
        items.append({"uid": uuid.uuid4().hex, "account": s.account, "meter": s.meter,
                      "timestamp": _ts(s.step), "data": {"gb": gb, "files": 1, "seconds": 1}})
    found = await s.api.call("POST", "/v1/measurements", scope="runtime",
                             json={"measurements": items})
    return list(found["results"])


async def _rated_rows(db: asyncpg.Connection, table: str, account: str) -> list[tuple[str, D]]:
    rows = await db.fetch(f"SELECT r.uid, r.amount FROM {table} r JOIN accounts a "
                          "ON a.id = r.account_id WHERE a.code = $1 ORDER BY r.created_at", account)
    return [(r["uid"], D(r["amount"])) for r in rows]


async def test_a_batch_draws_one_debit_or_give_back_per_charge_and_answers_each_share(
        api: Api, db: asyncpg.Connection) -> None:
    s = await _setup(api)
    pricing = await s.price("LATEST", "per_unit", [(None, "1.50")])
    up = await _batch(s, 10, 4)
    # each answer is what that measurement moved: 10 GB = 15.00, then 4 GB gives 9.00 back
    assert [d["amount"] for d in up[0]["debits"]] == ["15.00"] and up[0]["credits"] == []
    assert up[1]["debits"] == [] and [c["amount"] for c in up[1]["credits"]] == ["9.00"]
    # but the ledger gets their net, once, named after the last: 6.00 drawn, nothing given back
    named = debit_uid(up[1]["uid"], pricing)
    assert await _rated_rows(db, "rated_debits", s.account) == [(named, D(6))]

    async def in_ledger() -> bool:  # (the group commit writes it just after the answer)
        return await _entries(db, named) == [("debit", D(-6))]

    await eventually(in_ledger, 5)
    assert await _rated_rows(db, "rated_credits", s.account) == []
    assert await s.live() == (D(994), D(0))
    down = await _batch(s, 2, 8, 1)  # 4 -> 2 (3.00 back), -> 8 (9.00 more), -> 1 (10.50 back)
    assert [([d["amount"] for d in r["debits"]], [c["amount"] for c in r["credits"]])
            for r in down] == [([], ["3.00"]), (["9.00"], []), ([], ["10.50"])]
    back = credit_uid(down[2]["uid"], pricing)
    assert await _rated_rows(db, "rated_credits", s.account) == [(back, D("4.50"))]
    assert await _entries(db, back) == [("adjustment", D("4.50"))]
    assert await s.live() == (D("998.50"), D(0))
    usage = await s.bill()
    assert D(usage["drawn"]) == D(usage["total"]) == D("1.50")


async def test_volume_price_falling_to_a_cheaper_band_is_credited_back(api: Api) -> None:
    s = await _setup(api)
    await s.price("SUM", "volume", [("10", "1.00"), (None, "0.50")])
    await s.measure(8)  # 8 at 1.00
    result = await s.measure(4)  # 12 units, every unit at 0.50 = 6.00: 2.00 back
    assert [c["amount"] for c in result["credits"]] == ["2.00"]
    assert await s.live() == (D(994), D(0))
    assert D((await s.bill())["drawn"]) == D(6)


async def test_give_back_reverses_newest_debit_first_overage_before_balances(
        api: Api, db: asyncpg.Connection) -> None:
    # balance A (3, drawn first) and B (10); LATEST priced 1 per GB
    s = await _setup(api, grants=(("3", 1), ("10", 2)))
    pricing = await s.price("LATEST", "per_unit", [(None, "1")])
    a, b = [bal["id"] for bal in (await api.live(s.account))["balances"]]
    await s.measure(6)  # 6: A 3, B 3
    await s.measure(15)  # 9 more: B 7, overage 2
    assert await s.live() == (D(0), D(2))
    last = await s.measure(1)  # down to 1: 14 back
    # the newest debit first (its overage 2, then B 7), then the older one (B 3, then A 2)
    rows = await db.fetch("SELECT kind, balance_id, amount FROM ledger_entries "
                          "WHERE usage_uid = $1 ORDER BY id", credit_uid(last["uid"], pricing))
    assert [(r["kind"], r["balance_id"], D(r["amount"])) for r in rows] == [
        ("overage", None, D(2)), ("adjustment", b, D(7)), ("adjustment", b, D(3)),
        ("adjustment", a, D(2))]
    remaining = {bal["id"]: D(bal["remaining"]) for bal in (await api.live(s.account))["balances"]}
    assert remaining == {a: D(2), b: D(10)}
    assert await s.live() == (D(12), D(0))
    # Postgres agrees with the hot copy after a rebuild
    overage = await db.fetchval("SELECT -sum(amount) FROM ledger_entries WHERE kind = 'overage' "
                                "AND account_id = (SELECT id FROM accounts WHERE code = $1)",
                                s.account)
    assert D(overage) == 0


async def test_a_replayed_uid_changes_nothing(api: Api, db: asyncpg.Connection) -> None:
    s = await _setup(api)
    await s.price("LATEST", "per_unit", [(None, "1")])
    await s.measure(10)
    down = await s.measure(3, uid="down-1")
    assert [c["amount"] for c in down["credits"]] == ["7.00"]
    again = await api.call("POST", "/v1/measurements", scope="runtime", json={"measurements": [{
        "uid": "down-1", "account": s.account, "meter": s.meter, "timestamp": _ts(999),
        "data": {"gb": 0, "files": 1, "seconds": 1}}]})
    assert again["duplicates"] == 1 and again["results"][0]["credits"] == []
    assert await s.live() == (D(997), D(0))
    account_id = await db.fetchval("SELECT id FROM accounts WHERE code = $1", s.account)
    assert await db.fetchval("SELECT count(*) FROM rated_credits WHERE account_id = $1",
                             account_id) == 1
    # the worker finds nothing left to do
    assert await db.fetchval("SELECT count(*) FROM rated_credits WHERE account_id = $1 "
                             "AND settled_at IS NULL", account_id) == 0


async def test_a_voided_balance_gets_its_give_back_as_a_new_balance(api: Api) -> None:
    s = await _setup(api, grants=(("10", 100),))
    await s.price("LATEST", "per_unit", [(None, "1")])
    [original] = (await api.live(s.account))["balances"]
    await s.measure(6)
    await api.call("POST", f"/v1/balances/{original['id']}/void", json={})
    result = await s.measure(2)
    assert [c["amount"] for c in result["credits"]] == ["4.00"]
    balances = (await api.live(s.account))["balances"]
    [fresh] = [bal for bal in balances if bal["id"] != original["id"]]
    assert D(fresh["remaining"]) == 4 and fresh["expires_at"] is None
    assert await s.live() == (D(4), D(0))


async def test_the_worker_pays_a_give_back_a_crash_left(api: Api, app: Any,
                                                        db: asyncpg.Connection) -> None:
    s = await _setup(api, grants=(("100", 100),))
    account_id = await db.fetchval("SELECT id FROM accounts WHERE code = $1", s.account)
    period = datetime.now(UTC).date().replace(day=1)
    # what a process leaves when it dies after the rating commit: a debit never sent and a
    # give-back never paid, both of charge p1
    await db.execute(
        """INSERT INTO rated_debits (account_id, uid, product_code, credit_type, amount, ts,
                                     charge_key, period_start)
           VALUES ($1, 'r1:lost', $2, $3, 7, now(), 'p1', $4)""",
        account_id, s.names["storage"], s.names["credit_type"], period)
    await db.execute(
        """INSERT INTO rated_credits (account_id, uid, charge_key, period_start, product_code,
                                      credit_type, amount, ts, created_at)
           VALUES ($1, 'c1:lost', 'p1', $2, $3, $4, 5, now(), now() - interval '1 minute')""",
        account_id, period, s.names["storage"], s.names["credit_type"])
    assert await settle_unsettled(app.state.ctx, older_than_s=0) >= 1
    assert await s.live() == (D(98), D(0))  # 7 debited, 5 of it back
    assert await _entries(db, "c1:lost") == [("adjustment", D(5))]
    assert await db.fetchval("SELECT settled_at IS NOT NULL FROM rated_credits "
                             "WHERE account_id = $1 AND uid = 'c1:lost'", account_id)
    await settle_unsettled(app.state.ctx, older_than_s=0)  # again: nothing changes
    assert await s.live() == (D(98), D(0))


async def test_a_give_back_with_nothing_left_to_reverse_goes_to_the_account(
        api: Api, app: Any, db: asyncpg.Connection) -> None:
    s = await _setup(api, grants=(("10", 100),))
    account_id = await db.fetchval("SELECT id FROM accounts WHERE code = $1", s.account)
    period = datetime.now(UTC).date().replace(day=1)
    await db.execute(  # a give-back of a charge whose debits predate charge keys
        """INSERT INTO rated_credits (account_id, uid, charge_key, period_start, product_code,
                                      credit_type, amount, ts)
           VALUES ($1, 'c9:old', 'p9', $2, $3, $4, '1.25', now())""",
        account_id, period, s.names["storage"], s.names["credit_type"])
    await settle_unsettled(app.state.ctx, older_than_s=0)
    assert await s.live() == (D("11.25"), D(0))
    view = await api.live(s.account)
    [fresh] = [bal for bal in view["balances"] if D(bal["remaining"]) == D("1.25")]
    assert fresh["products"] == [s.names["storage"]]


async def test_two_processes_going_up_and_down_draw_exactly_the_final_price(
        api: Api, settings: Settings, keys: dict[str, str], db: asyncpg.Connection) -> None:
    s = await _setup(api, grants=(("50", 100),))
    await s.price("LATEST", "per_unit", [(None, "1")])
    await s.price("MEAN", "stair_step", [("5", "2"), ("10", "7"), (None, "20")])
    rng = random.Random(7)
    values = [rng.randint(0, 30) for _ in range(60)]
    items = [{"uid": f"u{i}", "account": s.account, "meter": s.meter, "timestamp": _ts(i),
              "data": {"gb": v, "files": 1, "seconds": 1}} for i, v in enumerate(values)]
    rng.shuffle(items)
    account_id = await db.fetchval("SELECT id FROM accounts WHERE code = $1", s.account)
    async with run_apps(settings, 2) as apps:
        clients = [httpx.AsyncClient(base_url=a.url, timeout=30) for a in apps]
        try:
            await asyncio.gather(*(
                call_as(clients[i % 2], keys["runtime"], "POST", "/v1/measurements", json=item)
                for i, item in enumerate(items)))
            for _ in range(100):  # anything left to the worker (interval 0.5 s) is paid promptly
                if not await db.fetchval("SELECT count(*) FROM rated_credits "
                                         "WHERE account_id = $1 AND settled_at IS NULL",
                                         account_id):
                    break
                await asyncio.sleep(0.2)
            view = await call_as(clients[1], keys["runtime"], "GET",
                               f"/v1/accounts/{s.account}/balances")
        finally:
            for client in clients:
                await client.aclose()
        assert not apps.tracebacks(), apps.tracebacks()
    mean = D(sum(values)) / len(values)
    expected = D(values[-1]) + (D(2) if mean <= 5 else D(7) if mean <= 10 else D(20))
    [total] = view["totals"]
    assert D(50) - D(total["available"]) + D(total["overage"]) == expected, (values, total)
    balance, overage = await db.fetchrow(
        """SELECT COALESCE(sum(amount) FILTER (WHERE kind <> 'overage'), 0),
                  COALESCE(-sum(amount) FILTER (WHERE kind = 'overage'), 0)
           FROM ledger_entries WHERE account_id = $1""", account_id)
    assert D(50) - balance + overage == expected
    usage = await s.bill()
    assert D(usage["drawn"]) == D(usage["total"]) == expected
