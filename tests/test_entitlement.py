"""check reasons (DESIGN invariant 6) and the entitlement flag flipping with credit."""

from __future__ import annotations

from tests.conftest import Api


async def test_access_is_cut_when_credit_runs_out_and_restored_when_it_arrives(api: Api) -> None:
    n = await api.setup()
    balance = await api.grant(n["account"], "1.00")
    assert (await api.check(n["account"], n["api"]))["allowed"] is True
    await api.usage(n["account"], n["api"], "1.00")
    denied = await api.check(n["account"], n["api"])
    # exhausted credit never looks like "not in plan"
    assert (denied["allowed"], denied["reason"], denied["available"]) == \
        (False, "insufficient_balance", "0.00")
    await api.call("POST", f"/v1/balances/{balance['id']}/adjustments", json={"amount": "0.50"})
    assert (await api.check(n["account"], n["api"]))["allowed"] is True


async def test_check_reasons(api: Api) -> None:
    n = await api.setup()
    assert (await api.check("no-such-account", n["api"]))["reason"] == "unknown_account"
    assert (await api.check(n["account"], "no-such-product"))["reason"] == "unknown_product"
    assert (await api.check(n["account"], n["api"]))["reason"] == "no_eligible_balance"
    await api.grant(n["account"], "3.00", products=[n["storage"]])
    assert (await api.check(n["account"], n["api"]))["reason"] == "no_eligible_balance"
    assert (await api.check(n["account"], n["storage"], amount="3.01"))["reason"] == \
        "insufficient_balance"
    assert (await api.check(n["account"], n["storage"], amount="3.00"))["reason"] == "ok"
    await api.call("PATCH", f"/v1/accounts/{n['account']}", json={"status": "blocked"})
    blocked = await api.check(n["account"], n["storage"])
    assert (blocked["allowed"], blocked["reason"]) == (False, "account_blocked")
    await api.call("PATCH", f"/v1/accounts/{n['account']}", json={"status": "active"})
    assert (await api.check(n["account"], n["storage"]))["allowed"] is True


async def test_check_and_consume_debits_only_when_allowed(api: Api) -> None:
    n = await api.setup()
    await api.grant(n["account"], "5.00")
    ok = await api.check(n["account"], n["api"], amount="4.00", consume=True, idempotency_key="c-1")
    assert (ok["allowed"], ok["consumed"], ok["available"]) == (True, True, "1.00")
    no = await api.check(n["account"], n["api"], amount="4.00", consume=True, idempotency_key="c-2")
    assert (no["allowed"], no["consumed"], no["reason"]) == (False, False, "insufficient_balance")
    again = await api.check(n["account"], n["api"], amount="4.00", consume=True,
                            idempotency_key="c-1")
    assert (again["allowed"], again["consumed"], again["duplicate"]) == (True, False, True)
    assert await api.available(n["account"]) == "1.00"


async def test_blocked_parent_blocks_its_children(api: Api) -> None:
    parent = await api.setup()
    child = await api.setup(parent=parent["account"])
    await api.grant(child["account"], "5.00")
    await api.call("PATCH", f"/v1/accounts/{parent['account']}", json={"status": "blocked"})
    assert (await api.check(child["account"], child["api"]))["reason"] == "account_blocked"
