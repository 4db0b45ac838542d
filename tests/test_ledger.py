"""The ledger: append-only entries, running balances, pagination, as-of reads, voids, expiry."""

from __future__ import annotations

import asyncio
import base64
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from tests.conftest import Api


async def test_ledger_lists_entries_with_running_balance_across_pages(api: Api) -> None:
    n = await api.setup()
    grant = await api.grant(n["account"], "10.00")
    for amount in ("1.00", "2.50", "0.25"):
        await api.usage(n["account"], n["api"], amount)
    await api.call("POST", f"/v1/balances/{grant['id']}/adjustments",
                   json={"amount": "-1.25", "description": "goodwill reversal"})
    first = await api.call("GET", f"/v1/accounts/{n['account']}/ledger", params={"limit": 2})
    second = await api.call("GET", f"/v1/accounts/{n['account']}/ledger",
                            params={"limit": 2, "cursor": first["next_cursor"]})
    third = await api.call("GET", f"/v1/accounts/{n['account']}/ledger",
                           params={"limit": 2, "cursor": second["next_cursor"]})
    rows = first["data"] + second["data"] + third["data"]
    assert [(r["kind"], r["amount"], r["running_balance"]) for r in rows] == [
        ("grant", "10.00", "10.00"), ("debit", "-1.00", "9.00"), ("debit", "-2.50", "6.50"),
        ("debit", "-0.25", "6.25"), ("adjustment", "-1.25", "5.00")]
    assert third["next_cursor"] is None
    balance = await api.call("GET", f"/v1/balances/{grant['id']}")
    assert (balance["granted"], balance["remaining"]) == ("10.00", "5.00")


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


async def test_running_balances_ride_in_the_cursor_for_every_credit_type(api: Api) -> None:
    """Two credit types interleaved over one-entry pages: each page's running balance is its
    credit type's, carried from page to page even across pages without that type; a cursor of
    the older shape (just the last id) gets the same figures summed from the ledger."""
    n = await api.setup()
    await api.call("POST", "/v1/credit-types", expect=201, json={
        "code": f"tok-{n['account']}", "name": "tokens", "kind": "custom", "decimal_places": 0})
    tokens = f"tok-{n['account']}"
    await api.grant(n["account"], "10.00")
    await api.grant(n["account"], "500", credit_type=tokens)
    await api.usage(n["account"], n["api"], "100", credit_type=tokens)
    await api.usage(n["account"], n["api"], "2.50")
    await api.usage(n["account"], n["api"], "450", credit_type=tokens)  # 50 owed
    path = f"/v1/accounts/{n['account']}/ledger"
    pages, cursor = [], None
    while True:
        page = await api.call("GET", path, params={"limit": 1} | ({"cursor": cursor} if cursor
                                                                  else {}))
        pages.append(page)
        cursor = page["next_cursor"]
        if cursor is None:
            break
    rows = [row for page in pages for row in page["data"]]
    assert [(r["credit_type"] == tokens, r["kind"], r["running_balance"]) for r in rows] == [
        (False, "grant", "10.00"), (True, "grant", "500"), (True, "debit", "400"),
        (False, "debit", "7.50"), (True, "debit", "0"), (True, "overage", "-50")]
    # the older cursor shape: the same page, its running balance summed once from the ledger
    older = await api.call("GET", path, params={"limit": 1, "cursor": _cursor(str(rows[3]["id"]))})
    assert older["data"] == pages[4]["data"]
    tokens_only = await api.call("GET", path, params={"limit": 1, "credit_type": tokens,
                                                      "cursor": _cursor(str(rows[2]["id"]))})
    assert tokens_only["data"] == pages[4]["data"]
    for bad in ("!!", _cursor("x"), _cursor("5;1"), _cursor("5;1=NaN"), _cursor("5;1=Infinity"),
                _cursor("5;a=1")):
        problem = await api.call("GET", path, params={"cursor": bad}, expect=422)
        assert problem["field"] == "query.cursor", (bad, problem)


async def test_balance_as_of_a_past_time(api: Api) -> None:
    n = await api.setup()
    await api.grant(n["account"], "10.00")
    await asyncio.sleep(0.05)
    between = datetime.now(UTC)
    await asyncio.sleep(0.05)
    await api.usage(n["account"], n["api"], "4.00")
    await api.usage(n["account"], n["api"], "7.00")
    path = f"/v1/accounts/{n['account']}/balance-at"
    past = await api.call("GET", path, params={"at": between.isoformat()})
    now = await api.call("GET", path, params={"at": datetime.now(UTC).isoformat()})
    assert past["totals"] == [{"credit_type": n["credit_type"], "balance": "10.00", "overage": "0.00"}]
    assert now["totals"] == [{"credit_type": n["credit_type"], "balance": "0.00", "overage": "1.00"}]
    before = await api.call("GET", path, params={"at": "2000-01-01T00:00:00Z"})
    assert before["totals"] == []


async def test_void_takes_what_remains_and_stops_drawdown(api: Api, db: asyncpg.Connection) -> None:
    n = await api.setup()
    grant = await api.grant(n["account"], "10.00")
    await api.usage(n["account"], n["api"], "3.00")
    voided = await api.call("POST", f"/v1/balances/{grant['id']}/void", json={"description": "fraud"})
    assert (voided["status"], voided["remaining"]) == ("voided", "0.00")
    entry = await db.fetchrow("SELECT amount FROM ledger_entries WHERE balance_id = $1 AND kind = 'void'",
                              grant["id"])
    assert str(entry["amount"]) == "-7.00"
    assert (await api.check(n["account"], n["api"]))["reason"] == "no_eligible_balance"
    again = await api.call("POST", f"/v1/balances/{grant['id']}/void", json={}, expect=409)
    assert again["field"] == "balance_id"


async def test_adjusting_below_zero_is_refused_and_changes_nothing(api: Api) -> None:
    n = await api.setup()
    grant = await api.grant(n["account"], "2.00")
    problem = await api.call("POST", f"/v1/balances/{grant['id']}/adjustments",
                             json={"amount": "-2.01"}, expect=422)
    assert problem["field"] == "amount"
    assert await api.available(n["account"]) == "2.00"


async def test_ledger_entries_cannot_be_updated_or_deleted(api: Api, db: asyncpg.Connection) -> None:
    n = await api.setup()
    grant = await api.grant(n["account"], "1.00")
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        await db.execute("UPDATE ledger_entries SET amount = 5 WHERE balance_id = $1", grant["id"])
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        await db.execute("DELETE FROM ledger_entries WHERE balance_id = $1", grant["id"])


async def test_expired_credit_is_written_off_by_the_worker(api: Api, db: asyncpg.Connection) -> None:
    n = await api.setup()
    soon = datetime.now(UTC) + timedelta(milliseconds=300)
    grant = await api.grant(n["account"], "4.00", expires_at=soon.isoformat())
    await api.usage(n["account"], n["api"], "1.00")
    for _ in range(60):
        row = await db.fetchrow("SELECT amount FROM ledger_entries WHERE balance_id = $1 AND kind = 'expire'",
                                grant["id"])
        if row:
            break
        await asyncio.sleep(0.1)
    assert row is not None and str(row["amount"]) == "-3.00"
    balance = await api.call("GET", f"/v1/balances/{grant['id']}")
    assert (balance["status"], balance["remaining"]) == ("expired", "0.00")


async def test_accounts_are_listed_updated_and_never_deleted(api: Api) -> None:
    n = await api.setup()
    updated = await api.call("PATCH", f"/v1/accounts/{n['account']}",
                             json={"name": "Renamed", "email": "billing@example.com"})
    assert (updated["name"], updated["email"]) == ("Renamed", "billing@example.com")
    assert (await api.call("DELETE", f"/v1/accounts/{n['account']}", expect=405))["status"] == 405
    seen, cursor = [], None
    while True:
        params = {"limit": 50, **({"cursor": cursor} if cursor else {})}
        page = await api.call("GET", "/v1/accounts", params=params)
        seen += [a["code"] for a in page["data"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert n["account"] in seen and len(seen) == len(set(seen))


async def test_accounts_are_found_by_email_status_and_parent(api: Api) -> None:
    parent = await api.setup()
    children = [await api.setup(parent=parent["account"]) for _ in range(3)]
    email = f"Billing-{uuid.uuid4().hex[:8]}@Example.com"
    for n in (parent, children[1]):
        await api.call("PATCH", f"/v1/accounts/{n['account']}", json={"email": email})
    await api.call("PATCH", f"/v1/accounts/{children[2]['account']}", json={"status": "blocked"})

    async def codes(**params: Any) -> list[str]:
        found: list[str] = []
        cursor = None
        while True:
            page = await api.call("GET", "/v1/accounts", params={
                **params, "limit": 2, **({"cursor": cursor} if cursor else {})})
            found += [a["code"] for a in page["data"]]
            if (cursor := page["next_cursor"]) is None:
                return found

    assert await codes(email=email.lower()) == [parent["account"], children[1]["account"]]
    assert await codes(parent=parent["account"]) == [c["account"] for c in children]
    assert await codes(parent=parent["account"], status="blocked") == [children[2]["account"]]
    assert await codes(parent=parent["account"], email=email.upper(), status="active") == [
        children[1]["account"]]
    blocked = await codes(status="blocked")
    assert children[2]["account"] in blocked and parent["account"] not in blocked
    assert await codes(parent=children[0]["account"]) == []
    for params, field in [({"parent": "no-such-account"}, "query.parent"),
                          ({"status": "closed"}, "query.status"),
                          ({"email": "not-an-email"}, "query.email")]:
        problem = await api.call("GET", "/v1/accounts", expect=422, params=params)
        assert problem["field"] == field, (params, problem)


async def test_balances_are_listed_by_status_and_credit_type(api: Api) -> None:
    n = await api.setup()
    other = await api.setup(credit_type="tok", decimal_places=0)
    kept = await api.grant(n["account"], "5.00")
    voided = await api.grant(n["account"], "2.00")
    await api.call("POST", f"/v1/balances/{voided['id']}/void", json={})
    tokens = await api.grant(n["account"], "7", credit_type=other["credit_type"])

    async def ids(**params: Any) -> list[int]:
        found: list[int] = []
        cursor = None
        while True:
            page = await api.call("GET", "/v1/balances", params={
                "account": n["account"], "limit": 1, **params,
                **({"cursor": cursor} if cursor else {})})
            found += [b["id"] for b in page["data"]]
            if (cursor := page["next_cursor"]) is None:
                return found

    assert await ids() == [kept["id"], voided["id"], tokens["id"]]
    assert await ids(status="active") == [kept["id"], tokens["id"]]
    assert await ids(status="voided") == [voided["id"]]
    assert await ids(status="active", credit_type=n["credit_type"]) == [kept["id"]]
    assert await ids(credit_type=other["credit_type"]) == [tokens["id"]]
    assert await ids(status="expired") == []
    for params, field in [({"status": "gone"}, "query.status"),
                          ({"credit_type": "no-such-type"}, "query.credit_type")]:
        problem = await api.call("GET", "/v1/balances", expect=422,
                                 params={"account": n["account"], **params})
        assert problem["field"] == field, (params, problem)
