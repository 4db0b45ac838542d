"""Bad input is a 4xx problem+json naming the failing field, and it changes nothing."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from app.entitlements.schemas import MAX_BATCH
from tests.conftest import Api, now_iso

TABLES = ("credit_types", "products", "accounts", "balances", "ledger_entries", "usage_events")


@dataclass(frozen=True)
class World:
    """One account with 10.00 of a 2-decimal credit type on one balance."""

    account: str
    product: str
    credit_type: str
    balance_id: int


@pytest.fixture(scope="module")
async def world(client: httpx.AsyncClient, keys: dict[str, str]) -> World:
    api = Api(client, keys)
    names = await api.setup(decimal_places=2)
    balance = await api.grant(names["account"], "10.00")
    return World(names["account"], names["api"], names["credit_type"], balance["id"])


@pytest.fixture
def snapshot(api: Api, db: asyncpg.Connection, world: World) -> Callable[[], Any]:
    """Everything a bad request could have changed: row counts, the live and stored balance."""

    async def take() -> dict[str, Any]:
        counts = {t: await db.fetchval(f"SELECT count(*) FROM {t}") for t in TABLES}
        return {**counts, "available": await api.available(world.account),
                "balance": await api.call("GET", f"/v1/balances/{world.balance_id}")}

    return take


def event(w: World, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"uid": uuid.uuid4().hex, "account": w.account, "product": w.product,
                            "amount": "1.00", "timestamp": now_iso()}
    for name, value in changes.items():
        if value is _MISSING:
            body.pop(name)
        else:
            body[name] = value
    return body


_MISSING = object()


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

NO_OFFSET = datetime.now(UTC).replace(tzinfo=None).isoformat()
TOO_OLD = (datetime.now(UTC) - timedelta(days=400)).isoformat()
IN_FUTURE = (datetime.now(UTC) + timedelta(days=1)).isoformat()
INVALID_JSON = b'{"amount": "1.00",'


@dataclass(frozen=True)
class Case:
    """One bad request: `body(world)` gives the JSON (or raw bytes) to send."""

    id: str
    method: str
    path: str
    body: Callable[[World], Any]
    field: str
    status: int = 422
    scope: str = "admin"


def check(id: str, field: str, status: int = 422, /, **changes: Any) -> Case:
    def body(w: World) -> Any:
        base: dict[str, Any] = {"account": w.account, "product": w.product, "amount": "1.00"}
        base.update(changes)
        return {k: v for k, v in base.items() if v is not _MISSING}

    return Case(f"check-{id}", "POST", "/v1/check", body, field, status, "runtime")


def usage(id: str, field: str, status: int = 422, /, **changes: Any) -> Case:
    return Case(f"usage-{id}", "POST", "/v1/usage", lambda w: event(w, **changes), field, status,
                "runtime")


def grant(id: str, field: str, status: int = 422, path: str | None = None, **changes: Any
          ) -> Case:
    def body(w: World) -> Any:
        return {k: v for k, v in {"amount": "1.00", **changes}.items() if v is not _MISSING}

    return Case(f"grant-{id}", "POST", path or "/v1/accounts/{account}/grants", body, field, status)


def adjust(id: str, field: str, status: int = 422, path: str | None = None, **changes: Any
           ) -> Case:
    return Case(f"adjustment-{id}", "POST", path or "/v1/balances/{balance_id}/adjustments",
                lambda w: {"amount": "1.00", **changes}, field, status)


def create(kind: str, path: str, valid: Callable[[], dict[str, Any]], id: str, field: str,
           status: int = 422, /, **changes: Any) -> Case:
    def body(w: World) -> Any:
        base = valid()
        base.update({k: getattr(w, v[1:]) if isinstance(v, str) and v.startswith("@") else v
                     for k, v in changes.items()})
        return {k: v for k, v in base.items() if v is not _MISSING}

    return Case(f"{kind}-{id}", "POST", path, body, field, status)


def _code() -> str:
    return f"new-{uuid.uuid4().hex[:8]}"


def account(id: str, field: str, status: int = 422, /, **changes: Any) -> Case:
    return create("account", "/v1/accounts", lambda: {"code": _code(), "name": "N"}, id, field,
                  status, **changes)


def product(id: str, field: str, status: int = 422, /, **changes: Any) -> Case:
    return create("product", "/v1/products", lambda: {"code": _code(), "name": "N"}, id, field,
                  status, **changes)


def credit_type(id: str, field: str, status: int = 422, /, **changes: Any) -> Case:
    return create("credit-type", "/v1/credit-types",
                  lambda: {"code": _code(), "name": "N", "kind": "custom", "decimal_places": 2},
                  id, field, status, **changes)


def raw(case: Case) -> Case:
    """The same route with a body that is not JSON at all."""
    return Case(case.id.rsplit("-", 1)[0] + "-invalid-json", case.method, case.path,
                lambda w: INVALID_JSON, "body", 400, case.scope)


# exponents no arithmetic can follow: each was a 500 (or, 1e-999999999, a grant of 0.00)
EXPONENTS = {"huge": "1e999999999", "tiny": "1e-999999999", "large": "1E+999999"}

# strings Python's Decimal reads but that are not decimals as the API documents them
LOOSE_TEXT = {"spaced": " 1 ", "underscored": "1_000", "fullwidth": "\uff11\uff12", "empty": ""}

CASES = [
    *[make(f"{name}-exponent-amount", "amount", amount=value)
      for make in (check, usage, grant, adjust) for name, value in EXPONENTS.items()],
    *[make(f"{name}-amount-text", "amount", amount=value)
      for make in (check, usage, grant, adjust) for name, value in LOOSE_TEXT.items()],
    credit_type("places-with-a-fraction", "decimal_places", decimal_places=2.5),
    # timestamps outside 2000 to 2999: the first was taken by Redis and then never written
    grant("expires-in-year-9999", "expires_at", expires_at="9999-12-31T23:59:59.999999Z"),
    grant("effective-in-year-0-in-utc", "effective_at", effective_at="0001-01-01T00:00:00+01:00"),
    grant("effective-in-1999", "effective_at", effective_at="1999-12-31T23:59:59Z"),
    Case("usage-summary-end-in-year-9999", "GET",
         "/v1/accounts/{account}/usage-summary?end=9999-12-31T23:59:59Z", lambda w: None,
         "query.end", 422, "runtime"),
    Case("balance-at-in-year-0-in-utc", "GET",
         "/v1/accounts/{account}/balance-at?at=0001-01-01T00:00:00%2B01:00", lambda w: None,
         "query.at"),
    Case("check-huge-exponent-number", "POST", "/v1/check", lambda w: json.dumps(
        {"account": w.account, "product": w.product, "amount": "@"}).replace(
        '"@"', "1e999999999").encode(), "amount", 422, "runtime"),
    # check: unknown references, bad amounts, wrong types, unknown fields
    check("unknown-credit-type", "credit_type", credit_type="nope"),
    check("consume-reserved-key", "idempotency_key", consume=True, idempotency_key="r1:x"),
    check("zero-amount", "amount", amount="0"),
    check("negative-amount", "amount", amount="-1.00"),
    check("too-many-decimals", "amount", amount="1.005"),
    check("giant-amount", "amount", amount="1e30"),
    check("nan-amount", "amount", amount="NaN"),
    check("infinite-amount", "amount", amount="Infinity"),
    check("amount-as-list", "amount", amount=["1"]),
    check("consume-as-number", "consume", consume=0),  # wrong JSON types are not coerced
    check("consume-as-string", "consume", consume="true"),
    check("account-as-number", "account", account=42),
    check("missing-account", "account", account=_MISSING),
    check("unknown-field", "surprise", surprise=1),
    check("malformed-idempotency-key", "idempotency_key", consume=True, idempotency_key="has space"),
    check("consume-without-key", "idempotency_key", consume=True),
    raw(check("x", "body")),
    # usage, one event
    usage("unknown-account", "account", account="nope"),
    # the shapes of rated debits' uids are reserved (a collision would deduplicate a charge)
    usage("reserved-uid-rated", "uid", uid="r12:abc"),
    usage("reserved-uid-standing", "uid", uid="s3:2026-11-01"),
    usage("reserved-uid-counter", "uid", uid="c7:2026-11-01:100"),
    usage("unknown-product", "product", product="nope"),
    usage("unknown-credit-type", "credit_type", credit_type="nope"),
    usage("zero-amount", "amount", amount="0"),
    usage("negative-amount", "amount", amount="-1"),
    usage("too-many-decimals", "amount", amount="1.005"),
    usage("giant-amount", "amount", amount="1e30"),
    usage("giant-number-amount", "amount", amount=10**30),
    usage("amount-as-list", "amount", amount=["1.00"]),
    usage("account-as-number", "account", account=42),
    usage("timestamp-yesterday", "timestamp", timestamp="yesterday"),
    usage("timestamp-without-offset", "timestamp", timestamp=NO_OFFSET),
    usage("timestamp-missing", "timestamp", timestamp=_MISSING),
    usage("timestamp-too-old", "timestamp", timestamp=TOO_OLD),
    usage("timestamp-in-future", "timestamp", timestamp=IN_FUTURE),
    usage("timestamp-as-unix-number", "timestamp", timestamp=1_700_000_000),
    usage("uid-empty", "uid", uid=""),
    usage("uid-with-space", "uid", uid="has space"),
    usage("uid-missing", "uid", uid=_MISSING),
    usage("uid-as-number", "uid", uid=7),
    usage("unknown-field", "surprise", surprise="x"),
    Case("usage-not-an-object", "POST", "/v1/usage", lambda w: ["x"], "body", 422, "runtime"),
    Case("usage-batch-too-large", "POST", "/v1/usage",
         lambda w: {"events": [event(w) for _ in range(MAX_BATCH + 1)]}, "events", 422, "runtime"),
    Case("usage-batch-empty", "POST", "/v1/usage", lambda w: {"events": []}, "events", 422,
         "runtime"),
    Case("usage-batch-not-a-list", "POST", "/v1/usage", lambda w: {"events": event(w)}, "events",
         422, "runtime"),
    Case("usage-batch-unknown-field", "POST", "/v1/usage",
         lambda w: {"events": [event(w)], "surprise": 1}, "surprise", 422, "runtime"),
    raw(usage("x", "body")),
    # grants
    grant("unknown-account", "account", 404, path="/v1/accounts/nope/grants"),
    grant("unknown-credit-type", "credit_type", credit_type="nope"),
    grant("unknown-product", "products", products=["nope"]),
    grant("zero-amount", "amount", amount="0"),
    grant("negative-amount", "amount", amount="-5"),
    grant("too-many-decimals", "amount", amount="1.005"),
    grant("giant-amount", "amount", amount="1e30"),
    grant("amount-as-list", "amount", amount=["1"]),
    grant("priority-as-string", "priority", priority="5"),
    grant("priority-as-boolean", "priority", priority=True),
    grant("amount-missing", "amount", amount=_MISSING),
    grant("effective-yesterday", "effective_at", effective_at="yesterday"),
    grant("effective-without-offset", "effective_at", effective_at=NO_OFFSET),
    grant("expires-yesterday", "expires_at", expires_at="yesterday"),
    grant("expires-as-unix-number", "expires_at", expires_at=4_000_000_000),
    grant("nul-in-description", "description", description="a\u0000b"),
    grant("expires-before-effective", "expires_at", effective_at=IN_FUTURE, expires_at=TOO_OLD),
    grant("products-as-string", "products", products="api"),
    grant("unknown-field", "surprise", surprise=True),
    raw(grant("x", "body")),
    # adjustments
    adjust("unknown-balance", "balance_id", 404, path="/v1/balances/999999999/adjustments"),
    adjust("non-numeric-balance", "balance_id", 404, path="/v1/balances/abc/adjustments"),
    adjust("zero-amount", "amount", amount="0"),
    adjust("below-zero", "amount", amount="-10.01"),
    adjust("too-many-decimals", "amount", amount="1.005"),
    adjust("giant-amount", "amount", amount="1e30"),
    adjust("giant-negative-amount", "amount", amount="-1e30"),
    adjust("amount-as-list", "amount", amount=["1"]),
    adjust("unknown-field", "surprise", surprise=1),
    raw(adjust("x", "body")),
    # accounts
    account("unknown-credit-type", "credit_type", credit_type="nope"),
    account("unknown-parent", "parent", parent="nope"),
    account("duplicate-code", "code", 409, code="@account"),
    account("malformed-code", "code", code="has space"),
    account("code-as-number", "code", code=42),
    account("missing-name", "name", name=_MISSING),
    account("empty-name", "name", name=""),
    account("unknown-status", "status", status="gone"),
    account("malformed-email", "email", email="not an email"),
    account("nul-in-name", "name", name="\u0000"),
    account("unknown-field", "surprise", surprise=1),
    raw(account("x", "body")),
    Case("account-patch-unknown", "PATCH", "/v1/accounts/nope", lambda w: {"name": "x"}, "code",
         404),
    Case("account-patch-unknown-credit-type", "PATCH", "/v1/accounts/{account}",
         lambda w: {"credit_type": "nope"}, "credit_type"),
    Case("account-patch-null-name", "PATCH", "/v1/accounts/{account}", lambda w: {"name": None},
         "name"),
    Case("account-patch-unknown-field", "PATCH", "/v1/accounts/{account}",
         lambda w: {"parent": "x"}, "parent"),
    # products
    product("duplicate-code", "code", 409, code="@product"),
    product("malformed-code", "code", code="has space"),
    product("missing-code", "code", code=_MISSING),
    product("name-as-number", "name", name=1),
    product("nul-in-name", "name", name="x\u0000"),
    Case("product-rename-nul", "PATCH", "/v1/products/{product}", lambda w: {"name": "\u0000"},
         "name"),
    Case("product-read-nul-code", "GET", "/v1/products/%00", lambda w: None, "code", 404),
    product("unknown-field", "surprise", surprise=1),
    raw(product("x", "body")),
    # credit types
    credit_type("duplicate-code", "code", 409, code="@credit_type"),
    credit_type("too-many-places", "decimal_places", decimal_places=10),
    credit_type("negative-places", "decimal_places", decimal_places=-1),
    credit_type("places-as-string", "decimal_places", decimal_places="two"),
    credit_type("unknown-kind", "kind", kind="gold"),
    credit_type("unknown-field", "surprise", surprise=1),
    raw(credit_type("x", "body")),
    # query strings
    Case("balances-unknown-account", "GET", "/v1/balances?account=nope", lambda w: None,
         "account", 404),
    Case("balances-missing-account", "GET", "/v1/balances", lambda w: None, "query.account"),
    Case("balances-limit-zero", "GET", "/v1/balances?account={account}&limit=0", lambda w: None,
         "query.limit"),
    Case("balances-bad-cursor", "GET", "/v1/balances?account={account}&cursor=!!", lambda w: None,
         "query.cursor"),
    # cursors this API never wrote, past a bigint or a datetime (each was a 500)
    *[Case(f"list-cursor-past-a-bigint-{i}", "GET", f"{path}cursor={_cursor(str(2**70))}",
           lambda w: None, "query.cursor") for i, path in enumerate((
               "/v1/accounts?", "/v1/products?", "/v1/credit-types?", "/v1/balances?account={account}&",
               "/v1/accounts/{account}/ledger?", "/v1/webhook-deliveries?", "/v1/audit-log?",
               "/v1/meters?", "/v1/bills?", "/v1/accounts/{account}/purchases?"))],
    Case("ledger-cursor-sum-past-arithmetic", "GET",
         f"/v1/accounts/{{account}}/ledger?cursor={_cursor('5;1=1e999999999')}", lambda w: None,
         "query.cursor"),
    Case("usage-events-cursor-past-datetime", "GET",
         f"/v1/accounts/{{account}}/usage-events?cursor={_cursor(f'{10**20}|u')}",
         lambda w: None, "query.cursor", 422, "runtime"),
    Case("balance-at-yesterday", "GET", "/v1/accounts/{account}/balance-at?at=yesterday",
         lambda w: None, "query.at"),
    Case("balance-at-unix-number", "GET", "/v1/accounts/{account}/balance-at?at=1700000000",
         lambda w: None, "query.at"),
    Case("ledger-nul-credit-type", "GET", "/v1/accounts/{account}/ledger?credit_type=%00",
         lambda w: None, "query.credit_type"),
    Case("balance-at-missing", "GET", "/v1/accounts/{account}/balance-at", lambda w: None,
         "query.at"),
    Case("ledger-unknown-credit-type", "GET", "/v1/accounts/{account}/ledger?credit_type=nope",
         lambda w: None, "query.credit_type"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_bad_input_is_a_problem_naming_the_field_and_changes_nothing(
    case: Case, api: Api, world: World, snapshot: Callable[[], Any]
) -> None:
    before = await snapshot()
    body = case.body(world)
    content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {**(api.admin if case.scope == "admin" else api.runtime),
               "content-type": "application/json"}
    path = case.path.format(account=world.account, balance_id=world.balance_id,
                            product=world.product)
    response = await api.client.request(case.method, path, content=content, headers=headers)
    assert response.status_code == case.status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["status"] == case.status
    assert problem["field"] == case.field, problem
    assert problem["type"].endswith("/" + problem["code"]) and problem["detail"]
    assert "Traceback" not in response.text
    assert await snapshot() == before


@pytest.mark.parametrize("key", ['a"b', "a b", "-lead", "x" * 129, "r5:reserved", "é"])
async def test_consume_key_in_the_header_is_held_to_the_uid_rules(
        key: str, api: Api, world: World, snapshot: Callable[[], Any]) -> None:
    """The Idempotency-Key header becomes the consumed debit's usage uid (and travels in the
    journal as is): the same rules as `idempotency_key` in the body, 422 naming the header."""
    before = await snapshot()
    response = await api.client.post(
        "/v1/check", json={"account": world.account, "product": world.product,
                           "amount": "1.00", "consume": True},
        headers={**api.runtime, "Idempotency-Key": key.encode()})
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "Idempotency-Key"
    assert await snapshot() == before


@pytest.mark.parametrize("account", ["nope", "also-nope"])
async def test_check_of_an_unknown_account_or_product_fails_closed_with_its_reason(
    api: Api, world: World, account: str, snapshot: Callable[[], Any]
) -> None:
    before = await snapshot()
    assert await api.check(account, world.product, amount="1.00") == {
        "allowed": False, "reason": "unknown_account", "available": None, "credit_type": None,
        "consumed": False, "duplicate": False}
    result = await api.check(world.account, "no-such-product", amount="1.00", consume=True,
                             idempotency_key=uuid.uuid4().hex)
    assert (result["allowed"], result["reason"], result["consumed"]) == (
        False, "unknown_product", False)
    assert await snapshot() == before


async def test_batch_accepts_valid_events_and_lists_each_rejected_one(
    api: Api, world: World, db: asyncpg.Connection
) -> None:
    names = await api.setup(decimal_places=2)
    acct, prod = names["account"], names["api"]
    await api.grant(acct, "10.00")
    w = World(acct, prod, names["credit_type"], 0)
    events = [
        event(w, amount="1.25"),
        event(w, account="nope"),
        event(w, product="nope"),
        event(w, credit_type="nope"),
        event(w, amount="0"),
        event(w, amount="-1"),
        event(w, amount="1.005"),
        event(w, amount="1e30"),
        event(w, amount=["1"]),
        event(w, account=7),
        event(w, timestamp="yesterday"),
        event(w, timestamp=NO_OFFSET),
        event(w, timestamp=_MISSING),
        event(w, uid=""),
        event(w, uid="has space"),
        event(w, uid=_MISSING),
        event(w, surprise=1),
        "not an event",
        event(w, amount="2.50"),
    ]
    expected_fields = {1: "account", 2: "product", 3: "credit_type", 4: "amount", 5: "amount",
                       6: "amount", 7: "amount", 8: "amount", 9: "account", 10: "timestamp",
                       11: "timestamp", 12: "timestamp", 13: "uid", 14: "uid", 15: "uid",
                       16: "surprise", 17: "body"}
    out = await api.call("POST", "/v1/usage", scope="runtime", json={"events": events})
    assert (out["accepted"], out["duplicates"], out["rejected"]) == (2, 0, len(expected_fields))
    results = out["results"]
    assert len(results) == len(events)
    for i in (0, len(events) - 1):
        assert results[i]["status"] == "accepted" and results[i]["uid"] == events[i]["uid"]
        assert results[i]["error"] is None
    for i, field in expected_fields.items():
        result = results[i]
        assert result["status"] == "rejected", (i, result)
        assert result["error"]["field"] == f"events.{i}.{field}", (i, result)
        assert result["error"]["code"] and result["error"]["message"], (i, result)
        raw_event = events[i]
        if isinstance(raw_event, dict) and isinstance(raw_event.get("uid"), str):
            assert result["uid"] == raw_event["uid"]
        assert result["available"] is None
    assert await api.available(acct) == "6.25"
    account_id = await db.fetchval("SELECT id FROM accounts WHERE code = $1", acct)
    uids = await db.fetch("SELECT uid, amount FROM usage_events WHERE account_id = $1", account_id)
    assert sorted((r["uid"], str(r["amount"])) for r in uids) == sorted(
        [(events[0]["uid"], "1.25"), (events[-1]["uid"], "2.50")])


async def test_numbers_in_every_documented_form_are_taken(api: Api) -> None:
    """The other side of the cases above: a decimal string with an exponent, a leading point or
    a sign, and an integer field sent as a whole number with a fraction part (JSON Schema's
    "integer" includes 2.0, and some encoders write whole doubles so)."""
    n = await api.setup()
    path = f"/v1/accounts/{n['account']}/grants"
    granted = [(await api.call("POST", path, expect=201, json={"amount": amount}))["granted"]
               for amount in ("1e1", ".5", "+2", "3.")]
    assert granted == ["10.00", "0.50", "2.00", "3.00"]
    made = await api.call("POST", "/v1/credit-types", expect=201, json={
        "code": f"whole-{uuid.uuid4().hex[:8]}", "name": "N", "kind": "custom",
        "decimal_places": 2.0})
    assert made["decimal_places"] == 2
