"""Holds: credit set aside only when covered, captured or released once, never overspent."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import redis.asyncio as aioredis

from app.entitlements import holds
from app.settings import Settings
from tests.conftest import Api
from tests.procs import run_apps
from tests.webhook_receiver import eventually


async def _hold(api: Api, account: str, product: str, amount: str, expect: int = 201,
                uid: str | None = None, **extra: Any) -> dict[str, Any]:
    result: dict[str, Any] = await api.call(
        "POST", f"/v1/accounts/{account}/holds", scope="runtime", expect=expect,
        json={"uid": uid or uuid.uuid4().hex, "product": product, "amount": amount, **extra})
    return result


async def _entries(db: asyncpg.Connection, account: str) -> list[tuple[str, int, Decimal]]:
    rows = await db.fetch(
        """SELECT e.kind, e.balance_id, e.amount FROM ledger_entries e
           JOIN accounts a ON a.id = e.account_id WHERE a.code = $1 ORDER BY e.id""", account)
    return [(r["kind"], r["balance_id"], Decimal(r["amount"])) for r in rows]


async def test_a_hold_sets_credit_aside_and_capture_gives_back_the_rest(
        api: Api, db: asyncpg.Connection) -> None:
    n = await api.setup()
    first = await api.grant(n["account"], "3.00", priority=1)
    second = await api.grant(n["account"], "10.00", priority=2)
    held = await _hold(api, n["account"], n["api"], "5.00", uid="job-1")
    assert (held["status"], held["allowed"], held["available"], held["amount"]) == \
        ("held", True, "8.00", "5.00")
    assert await api.available(n["account"]) == "8.00"
    # drawn in drawdown order: 3 from the first balance, 2 from the second
    assert await _entries(db, n["account"]) == [
        ("grant", first["id"], Decimal("3.00")), ("grant", second["id"], Decimal("10.00")),
        ("hold", first["id"], Decimal("-3.00")), ("hold", second["id"], Decimal("-2.00"))]

    url = f"/v1/accounts/{n['account']}/holds/job-1"
    captured = await api.call("POST", f"{url}/capture", scope="runtime", json={"amount": "3.50"})
    assert (captured["status"], captured["captured"]) == ("captured", "3.50")
    # the first 3.50 of the allocations is kept: 1.50 goes back to the second balance
    assert (await _entries(db, n["account"]))[4:] == [("release", second["id"], Decimal("1.50"))]
    assert await api.available(n["account"]) == "9.50"
    # the same capture again is answered the same; another is refused; nothing moves
    again = await api.call("POST", f"{url}/capture", scope="runtime", json={"amount": "3.50"})
    assert again["captured"] == "3.50" and again["duplicate"] is True
    other = await api.call("POST", f"{url}/capture", scope="runtime", expect=409,
                           json={"amount": "1.00"})
    assert other["field"] == "uid"
    await api.call("POST", f"{url}/release", scope="runtime", expect=409, json={})
    assert await api.available(n["account"]) == "9.50"
    read = await api.call("GET", url, scope="runtime")
    assert (read["status"], read["captured"], read["amount"]) == ("captured", "3.50", "5.00")


async def test_release_expiry_and_a_refused_hold(api: Api, app: Any,
                                                 db: asyncpg.Connection) -> None:
    n = await api.setup()
    await api.grant(n["account"], "4.00")
    refused = await _hold(api, n["account"], n["api"], "4.01", expect=200, uid="big")
    assert (refused["allowed"], refused["reason"], refused["status"]) == \
        (False, "insufficient_balance", "refused")
    await api.call("GET", f"/v1/accounts/{n['account']}/holds/big", scope="runtime",
                   expect=404)
    assert await api.available(n["account"]) == "4.00"

    await _hold(api, n["account"], n["api"], "1.00", uid="a")
    await _hold(api, n["account"], n["api"], "2.00", uid="b", expires_in_s=1)
    assert await api.available(n["account"]) == "1.00"
    released = await api.call("POST", f"/v1/accounts/{n['account']}/holds/a/release",
                              scope="runtime", json={})
    assert (released["status"], released["captured"]) == ("released", None)
    assert await api.available(n["account"]) == "2.00"
    await asyncio.sleep(1.1)
    await holds.settle(app.state.ctx)

    async def expired() -> bool:  # (the app's own worker may have claimed it first, and be
        # ending it still: the pass above then leaves it to that worker)
        hold = await api.call("GET", f"/v1/accounts/{n['account']}/holds/b", scope="runtime")
        return bool(hold["status"] == "expired")

    await eventually(expired)
    assert await api.available(n["account"]) == "4.00"
    # a refused uid may be asked again (nothing was held under it)
    again = await _hold(api, n["account"], n["api"], "4.00", uid="big")
    assert again["status"] == "held" and await api.available(n["account"]) == "0.00"
    kinds = [k for k, _, _ in await _entries(db, n["account"])]
    assert kinds == ["grant", "hold", "hold", "release", "release", "hold"]


async def test_a_repeated_uid_answers_the_first_hold(api: Api, db: asyncpg.Connection) -> None:
    n = await api.setup()
    await api.grant(n["account"], "10.00")
    first = await _hold(api, n["account"], n["api"], "6.00", uid="same")
    again = await _hold(api, n["account"], n["api"], "9.00", uid="same", expect=200)
    assert (again["amount"], again["duplicate"], again["status"]) == ("6.00", True, "held")
    both = await asyncio.gather(*(api.client.post(
        f"/v1/accounts/{n['account']}/holds", headers=api.runtime,
        json={"uid": "racing", "product": n["api"], "amount": "1.00"}) for _ in range(5)))
    assert sorted(r.status_code for r in both) == [200, 200, 200, 200, 201]
    assert await api.available(n["account"]) == "3.00" and first["available"] == "4.00"


async def test_holds_never_overspend_across_processes_and_survive_a_redis_flush(
        api: Api, settings: Settings, db: asyncpg.Connection, redis: aioredis.Redis) -> None:
    """200 holds of 1.00 from two app processes against 50.00: exactly 50 are held."""
    n = await api.setup()
    await api.grant(n["account"], "50.00")
    async with run_apps(settings, 2) as apps:
        async with apps[0].client() as one, apps[1].client() as two:
            async def hold(i: int) -> httpx.Response:
                return await (one, two)[i % 2].post(
                    f"/v1/accounts/{n['account']}/holds", headers=api.runtime,
                    json={"uid": f"h-{i}", "product": n["api"], "amount": "1.00"})

            answers = await asyncio.gather(*(hold(i) for i in range(200)))
            held = [i for i, r in enumerate(answers) if r.status_code == 201]
            refused = [r.json()["reason"] for r in answers if r.status_code == 200]
            assert len(held) == 50 and set(refused) == {"insufficient_balance"}, \
                [r.text for r in answers if r.status_code not in (200, 201)]
            assert await _available(one, api, n["account"]) == "0.00"

            await redis.flushall()  # the hot copy is rebuilt from Postgres: holds included
            ends = await asyncio.gather(*(
                (one, two)[i % 2].post(f"/v1/accounts/{n['account']}/holds/h-{i}/capture",
                                       headers=api.runtime, json={"amount": "0.25"})
                for i in held))
            assert {r.status_code for r in ends} == {200}, [r.text for r in ends]
            assert await _available(two, api, n["account"]) == "37.50"  # 50 - 50 x 0.25
        assert apps.tracebacks() == ""
    sums = await db.fetch(
        """SELECT e.kind, sum(e.amount) AS total FROM ledger_entries e JOIN accounts a
           ON a.id = e.account_id WHERE a.code = $1 GROUP BY e.kind""", n["account"])
    assert {r["kind"]: Decimal(r["total"]) for r in sums} == {
        "grant": Decimal("50.00"), "hold": Decimal("-50.00"), "release": Decimal("37.50")}


async def _available(client: httpx.AsyncClient, api: Api, account: str) -> str:
    """Through one of the processes (they share a hot state of their own, not the test app's)."""
    live = await client.get(f"/v1/accounts/{account}/balances", headers=api.runtime)
    return str(live.json()["totals"][0]["available"])


async def test_bad_holds_are_refused_and_change_nothing(
        api: Api, client: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    n = await api.setup()
    await api.grant(n["account"], "5.00")
    url = f"/v1/accounts/{n['account']}/holds"
    good = {"uid": "ok-1", "product": n["api"], "amount": "1.00"}
    for change, field in [({"amount": "0"}, "amount"), ({"amount": "-1"}, "amount"),
                          ({"amount": "0.001"}, "amount"), ({"amount": "x"}, "amount"),
                          ({"uid": "h0:x"}, None), ({"uid": ""}, "uid"), ({"uid": "a" * 126}, "uid"),
                          ({"product": "no-such-product"}, "product"),
                          ({"credit_type": "no-such-type"}, "credit_type"),
                          ({"expires_in_s": 0}, "expires_in_s"),
                          ({"expires_in_s": 86_401}, "expires_in_s"), ({"extra": 1}, "extra")]:
        body = {**good, **change}
        response = await client.post(url, headers=api.runtime, json=body)
        if field is None:  # a shape that is fine for a hold uid (its debit is h0:h0:x)
            assert response.status_code == 201, response.text
            await client.post(f"{url}/h0:x/release", headers=api.runtime, json={})
            continue
        assert response.status_code == 422, (change, response.text)
        assert response.json()["field"] == field, (change, response.text)
    missing = await client.post("/v1/accounts/no-such-account/holds", headers=api.runtime,
                                json=good)
    assert missing.status_code == 404 and missing.json()["field"] == "code"
    assert await api.available(n["account"]) == "5.00"
    await _hold(api, n["account"], n["api"], "2.00", uid="cap")
    over = await client.post(f"{url}/cap/capture", headers=api.runtime, json={"amount": "2.01"})
    assert over.status_code == 422 and over.json()["field"] == "amount"
    for bad in ("no-such-hold", "bad uid"):
        response = await client.post(f"{url}/{bad}/release", headers=api.runtime, json={})
        assert response.status_code == 404 and response.json()["field"] == "uid"
    # a usage uid in the holds' shape is refused on /v1/usage (it could shadow a hold's debit)
    shadow = await client.post("/v1/usage", headers=api.runtime, json={
        "uid": "h0:cap", "account": n["account"], "product": n["api"], "amount": "1",
        "timestamp": "2026-01-01T00:00:00Z"})
    assert shadow.status_code == 422 and shadow.json()["field"] == "uid"
    assert await api.available(n["account"]) == "3.00"


async def test_a_hold_a_crash_left_in_the_journal_comes_with_its_row(
        api: Api, app: Any, db: asyncpg.Connection) -> None:
    """Decided and journaled in Redis, never committed by its process (it died): whoever
    flushes the journal commits the hold's entries and its row together."""
    from app.entitlements.service import _usage_payload
    from app.hotstate.store import DecideArgs
    from app.ledger.ops import decide, now_ms

    ctx = app.state.ctx
    n = await api.setup()
    await api.grant(n["account"], "5.00")
    account = await ctx.catalog.account(n["account"])
    credit_type = account.credit_type
    at = now_ms()
    payload = _usage_payload(account, credit_type, "h0:orphan", n["api"], 200, at, at + 60_000)
    _, [decision] = await decide(ctx, account.root_id, [DecideArgs(
        account.id, account.chain_arg, "h0:orphan", n["api"], credit_type.code, 200, at, "c",
        payload)])
    assert decision.status == "ok"
    assert await db.fetchval("SELECT count(*) FROM holds WHERE uid = 'orphan' AND account_id "
                             "= $1", account.id) == 0
    await ctx.journal.recover_root(account.root_id)  # (the sweeper's work, or a retry's)
    row = await db.fetchrow("SELECT status, amount FROM holds WHERE uid = 'orphan' AND "
                            "account_id = $1", account.id)
    assert row is not None and (row["status"], Decimal(row["amount"])) == ("held", Decimal("2.00"))
    assert [k for k, _, _ in await _entries(db, n["account"])] == ["grant", "hold"]
    released = await api.call("POST", f"/v1/accounts/{n['account']}/holds/orphan/release",
                              scope="runtime", json={})
    assert released["status"] == "released" and await api.available(n["account"]) == "5.00"
