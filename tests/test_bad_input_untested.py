"""Bad-input rules no other test triggered: each is a 4xx problem+json naming the failing
field, and the request changes nothing (row counts and the resources it could touch are read
back the same)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import Api, now_iso
from tests.test_rating_config import _code, meter, plan
from tests.test_rating_drawdown import aggregation, month_start, price

# every table a rejected request below could write to (the setup has committed all it wrote)
TABLES = ("accounts", "balances", "ledger_entries", "usage_events", "holds", "balance_thresholds",
          "recurring_grants", "auto_recharge_configs", "conversion_rates", "counter_adjustments",
          "account_plans", "meters", "aggregations", "counters", "plan_templates", "plans",
          "pricings", "measurements", "rated_debits", "credit_types", "products")

IN_FUTURE = (datetime.now(UTC) + timedelta(days=1)).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class World:
    """An account (10.00 granted, 2.00 of it held, a low threshold of 5.00) of a 2-place fiat
    credit type; an account with no credit type at all, on a plan that rates `meter`'s gb; the
    rating configuration both use."""

    account: str
    credit_type: str
    api: str
    storage: str
    balance_id: int
    hold: str
    bare: str
    meter: str
    aggregation: str
    spare_aggregation: str
    counter: str
    template: str
    plan: str


@pytest.fixture(scope="module")
async def world(client: httpx.AsyncClient, keys: dict[str, str]) -> World:
    api = Api(client, keys)
    n = await api.setup(decimal_places=2)
    balance = await api.grant(n["account"], "10.00")
    hold = _code("hold")
    held = await api.call("POST", f"/v1/accounts/{n['account']}/holds", scope="runtime",
                          expect=201, json={"uid": hold, "product": n["api"], "amount": "2.00",
                                            "expires_in_s": 86_400})
    assert held["status"] == "held"
    await api.call("PUT", f"/v1/accounts/{n['account']}/thresholds/{n['credit_type']}",
                   json={"low": "5.00"})
    meter_code = await meter(api, n["storage"])
    plan_code = await plan(api, n["storage"], n["credit_type"], standing_charge="5")
    plan_row = await api.call("GET", f"/v1/plans/{plan_code}")
    counter = _code("counter")
    await api.call("POST", "/v1/counters", expect=201,
                   json={"code": counter, "name": "Seats", "unit": "seats"})
    priced = await aggregation(api, meter_code, "gb", "SUM")
    await price(api, plan_code, "per_unit", [(None, "1")], aggregation=priced)
    # an account made through the admin API with no default credit type (and no parent)
    bare = _code("bare")
    made = await api.call("POST", "/v1/accounts", expect=201, json={"code": bare, "name": "Bare"})
    assert made["credit_type"] is None
    attached = await api.call("POST", f"/v1/accounts/{bare}/plans", expect=201,
                              json={"plan": plan_code, "start_date": month_start()})
    assert attached["debits"] == []
    return World(n["account"], n["credit_type"], n["api"], n["storage"], balance["id"], hold,
                 bare, meter_code, priced, await aggregation(api, meter_code, "files", "SUM"),
                 counter, plan_row["template"], plan_code)


@pytest.fixture
def snapshot(api: Api, db: asyncpg.Connection, world: World) -> Callable[[], Any]:
    """Row counts and what the world's account shows: balance, hold, threshold, plans."""

    async def take() -> dict[str, Any]:
        counts = {t: await db.fetchval(f"SELECT count(*) FROM {t}") for t in TABLES}
        acct = world.account
        return {**counts, "available": await api.available(acct),
                "balance": await api.call("GET", f"/v1/balances/{world.balance_id}"),
                "hold": await api.call("GET", f"/v1/accounts/{acct}/holds/{world.hold}"),
                "thresholds": await api.call("GET", f"/v1/accounts/{acct}/thresholds"),
                "plans": await api.call("GET", f"/v1/accounts/{acct}/plans"),
                "bare_plans": await api.call("GET", f"/v1/accounts/{world.bare}/plans"),
                "pricings": await api.call("GET", "/v1/pricings", params={"plan": world.plan})}

    return take


Body = Callable[[World], Any]


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    path: str  # formatted with the World's fields
    body: Body | None
    field: str
    status: int = 422
    scope: str = "admin"


def _body(base: Callable[[World], dict[str, Any]], changes: dict[str, Any]) -> Body:
    """`base(world)` with `changes` (a value "@name" is the World's field; None drops a key)."""

    def make(w: World) -> dict[str, Any]:
        body = base(w)
        for key, value in changes.items():
            if value is None:
                body.pop(key, None)
            else:
                body[key] = getattr(w, value[1:]) if isinstance(value, str) and \
                    value.startswith("@") else value
        return body

    return make


def threshold(id: str, field: str, status: int = 422, path: str | None = None,
              **changes: Any) -> Case:
    return Case(f"threshold-{id}", "PUT", path or "/v1/accounts/{account}/thresholds/{credit_type}",
                _body(lambda w: {"low": "1.00"}, changes), field, status)


def check(id: str, field: str, **changes: Any) -> Case:
    return Case(f"check-{id}", "POST", "/v1/check", _body(
        lambda w: {"account": w.account, "product": w.api, "amount": "1.00"}, changes),
        field, scope="runtime")


def capture(id: str, amount: Any) -> Case:
    return Case(f"capture-{id}", "POST", "/v1/accounts/{account}/holds/{hold}/capture",
                lambda w: {"amount": amount}, "amount", scope="runtime")


def measurement(id: str, field: str, **changes: Any) -> Case:
    return Case(f"measurement-{id}", "POST", "/v1/measurements", _body(
        lambda w: {"uid": uuid.uuid4().hex, "account": w.account, "meter": w.meter,
                   "timestamp": now_iso(), "data": {"gb": 5, "files": 1, "seconds": 1}}, changes),
        field, scope="runtime")


def adjust_counter(id: str, field: str, status: int = 422, path: str | None = None,
                   **changes: Any) -> Case:
    return Case(f"counter-adjustment-{id}", "POST",
                path or "/v1/accounts/{account}/counter-adjustments",
                _body(lambda w: {"counter": w.counter, "effective": "2024-07-01", "level": "3"},
                      changes), field, status)


def rate(id: str, field: str, status: int = 422, path: str | None = None,
         **changes: Any) -> Case:
    return Case(f"conversion-rate-{id}", "POST",
                path or "/v1/credit-types/{credit_type}/conversion-rates",
                _body(lambda w: {"fiat": w.credit_type, "effective": "2024-01-01", "rate": "0.01"},
                      changes), field, status)


def recharge(id: str, field: str, path: str | None = None, **changes: Any) -> Case:
    return Case(f"auto-recharge-{id}", "PUT",
                path or "/v1/accounts/{account}/auto-recharge/{credit_type}",
                _body(lambda w: {"threshold": "5.00", "recharge_to": "20.00", "currency": "usd"},
                      changes), field)


def attach(id: str, field: str, status: int = 422, path: str | None = None,
           **changes: Any) -> Case:
    return Case(f"attach-plan-{id}", "POST", path or "/v1/accounts/{account}/plans",
                _body(lambda w: {"plan": w.plan, "start_date": "2024-07-01"}, changes),
                field, status)


def pricing(id: str, field: str, **changes: Any) -> Case:
    # the spare aggregation is priced nowhere: without the fault this would be a 201
    return Case(f"pricing-{id}", "POST", "/v1/pricings", _body(
        lambda w: {"plan": w.plan, "aggregation": w.spare_aggregation, "start_date": "2024-07-01",
                   "type": "tiered",
                   "bands": [{"up_to": "100", "price": "1"}, {"up_to": None, "price": "0.5"}]},
        changes), field)


def create(kind: str, path: str, base: Callable[[World], dict[str, Any]]) -> Callable[..., Case]:
    def make(id: str, field: str, status: int = 422, **changes: Any) -> Case:
        return Case(f"{kind}-{id}", "POST", path, _body(base, changes), field, status)

    return make


new_meter = create("meter", "/v1/meters", lambda w: {
    "code": _code("m"), "name": "m", "data_fields": [{"code": "gb", "category": "measure"}]})
new_aggregation = create("aggregation", "/v1/aggregations", lambda w: {
    "code": _code("a"), "name": "a", "meter": w.meter, "target_field": "gb", "function": "SUM"})
new_counter = create("counter", "/v1/counters", lambda w: {
    "code": _code("c"), "name": "c", "unit": "seats"})
new_template = create("plan-template", "/v1/plan-templates", lambda w: {
    "code": _code("t"), "name": "t", "product": w.storage, "bill_frequency": "monthly",
    "currency": w.credit_type})
new_plan = create("plan", "/v1/plans", lambda w: {"code": _code("p"), "name": "p",
                                                  "template": w.template})
grant = create("grant", "/v1/accounts/{account}/grants", lambda w: {"amount": "1.00"})


def bare(id: str, method: str, path: str, body: Body, scope: str = "admin") -> Case:
    """A request for the account with no default credit type that names none."""
    return Case(f"no-credit-type-{id}", method, path, body, "credit_type", 422, scope)


def get(id: str, path: str, field: str, status: int = 422) -> Case:
    return Case(id, "GET", path, None, field, status)


CASES = [
    # 1. low-balance thresholds
    threshold("low-too-many-places", "low", low="1.001"),
    threshold("low-zero", "low", low="0"),
    threshold("low-negative", "low", low="-1.00"),
    threshold("low-missing", "low", low=None),
    threshold("unknown-credit-type", "credit_type", path="/v1/accounts/{account}/thresholds/nope"),
    threshold("unknown-account", "account", 404, path="/v1/accounts/nope/thresholds/{credit_type}"),
    # 2. consume with no amount (with the idempotency key, and without it)
    check("consume-without-amount", "amount", amount=None, consume=True),
    check("consume-with-key-without-amount", "amount", amount=None, consume=True,
          idempotency_key="k-1"),
    # 3. capturing a hold
    capture("finer-than-places", "1.001"),
    capture("negative", "-1.00"),
    # 4. no credit type named and none by default
    bare("grant", "POST", "/v1/accounts/{bare}/grants", lambda w: {"amount": "1.00"}),
    bare("usage", "POST", "/v1/usage", lambda w: {
        "uid": uuid.uuid4().hex, "account": w.bare, "product": w.api, "amount": "1",
        "timestamp": now_iso()}, "runtime"),
    bare("hold", "POST", "/v1/accounts/{bare}/holds", lambda w: {
        "uid": uuid.uuid4().hex, "product": w.api, "amount": "1"}, "runtime"),
    bare("recurring-grant", "POST", "/v1/accounts/{bare}/recurring-grants",
         lambda w: {"amount": "1", "frequency": "monthly"}),
    # 5. measurements
    measurement("unknown-account", "account", account="nope"),
    measurement("timestamp-in-future", "timestamp", timestamp=IN_FUTURE),
    measurement("account-with-no-credit-type-to-draw", "account", account="@bare"),
    # 16. a dimension over 200 characters (200 itself is taken: see below)
    measurement("dimension-too-long", "data.region",
                data={"gb": 1, "files": 1, "seconds": 1, "region": "x" * 201}),
    # 6. counter adjustments
    adjust_counter("unknown-counter", "counter", counter="nope"),
    adjust_counter("negative-level", "level", level="-1"),
    adjust_counter("unknown-account", "code", 404, path="/v1/accounts/nope/counter-adjustments"),
    # 7. conversion rates
    rate("fiat-to-itself", "fiat"),
    rate("unknown-fiat", "fiat", fiat="nope"),
    rate("unknown-credit-type", "code", 404, path="/v1/credit-types/nope/conversion-rates"),
    # 8. auto-recharge (refused before any Stripe call)
    recharge("recharge-to-too-many-places", "recharge_to", recharge_to="20.001"),
    recharge("unknown-credit-type", "credit_type", path="/v1/accounts/{account}/auto-recharge/nope"),
    # 9. attaching a plan
    attach("end-on-start", "end_date", end_date="2024-07-01"),
    attach("end-before-start", "end_date", end_date="2024-06-30"),
    attach("unknown-account", "code", 404, path="/v1/accounts/nope/plans"),
    # 10. pricings
    pricing("per-unit-two-bands", "bands", type="per_unit"),
    pricing("middle-band-open-ended", "bands", bands=[
        {"up_to": "100", "price": "1"}, {"up_to": None, "price": "1"},
        {"up_to": None, "price": "1"}]),
    pricing("first-band-open-ended", "bands", bands=[
        {"up_to": None, "price": "1"}, {"up_to": "100", "price": "1"},
        {"up_to": None, "price": "1"}]),
    pricing("neither-aggregation-nor-counter", "aggregation", aggregation=None),
    pricing("unknown-plan", "plan", plan="nope"),
    pricing("unknown-aggregation", "aggregation", aggregation="nope"),
    pricing("unknown-counter", "counter", aggregation=None, counter="nope"),
    # 11. meters
    new_meter("duplicate-data-field-codes", "data_fields.1.code", data_fields=[
        {"code": "gb", "category": "measure"}, {"code": "gb", "category": "where"}]),
    new_meter("duplicate-third-data-field", "data_fields.2.code", data_fields=[
        {"code": "gb", "category": "measure"}, {"code": "tb", "category": "measure"},
        {"code": "tb", "category": "where"}]),
    new_meter("unknown-product", "product", product="nope"),
    new_meter("duplicate-code", "code", 409, code="@meter"),
    # 12. aggregations
    new_aggregation("unknown-meter", "meter", meter="nope"),
    new_aggregation("target-the-meter-lacks", "target_field", target_field="petabytes"),
    new_aggregation("duplicate-code", "code", 409, code="@aggregation"),
    # 13. counters, plan templates, plans
    new_counter("unknown-product", "product", product="nope"),
    new_counter("duplicate-code", "code", 409, code="@counter"),
    new_template("unknown-product", "product", product="nope"),
    new_template("unknown-currency", "currency", currency="nope"),
    new_template("negative-standing-charge", "standing_charge", standing_charge="-1"),
    new_template("negative-minimum-spend", "minimum_spend", minimum_spend="-0.01"),
    new_template("bill-interval-zero", "bill_interval", bill_interval=0),
    new_template("bill-interval-367", "bill_interval", bill_interval=367),
    new_template("duplicate-code", "code", 409, code="@template"),
    new_plan("unknown-template", "template", template="nope"),
    new_plan("negative-standing-charge", "standing_charge", standing_charge="-1"),
    new_plan("negative-minimum-spend", "minimum_spend", minimum_spend="-1"),
    new_plan("duplicate-code", "code", 409, code="@plan"),
    # 14. grants
    grant("priority-below-zero", "priority", priority=-1),
    grant("priority-over-a-million", "priority", priority=1_000_001),
    grant("empty-products", "products", products=[]),
    grant("source-breaking-its-pattern", "source", source="Promo Code!"),
    grant("source-starting-with-a-digit", "source", source="1promo"),
    # 15. reads with a bad query
    get("usage-at-not-a-day", "/v1/accounts/{account}/usage?at=yesterday", "query.at"),
    get("usage-at-no-such-day", "/v1/accounts/{account}/usage?at=2024-02-30", "query.at"),
    get("usage-at-before-2000", "/v1/accounts/{account}/usage?at=1999-12-31", "query.at"),
    get("usage-unknown-account", "/v1/accounts/nope/usage", "code", 404),
    get("pricings-unknown-plan", "/v1/pricings?plan=nope", "query.plan", 404),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_bad_input_is_a_problem_naming_the_field_and_changes_nothing(
        case: Case, api: Api, world: World, snapshot: Callable[[], Any]) -> None:
    before = await snapshot()
    body = None if case.body is None else json.dumps(case.body(world)).encode()
    headers = {**(api.admin if case.scope == "admin" else api.runtime),
               "content-type": "application/json"}
    path = case.path.format(**{k: getattr(world, k) for k in World.__dataclass_fields__})
    response = await api.client.request(case.method, path, content=body, headers=headers)
    assert response.status_code == case.status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert (problem["status"], problem["field"]) == (case.status, case.field), problem
    assert problem["type"].endswith("/" + problem["code"]) and problem["detail"]
    assert await snapshot() == before


async def test_a_rejected_capture_leaves_the_hold_held(api: Api, world: World) -> None:
    url = f"/v1/accounts/{world.account}/holds/{world.hold}"
    for amount in ("1.001", "-1.00", "2.01"):
        problem = await api.call("POST", f"{url}/capture", scope="runtime", expect=422,
                                 json={"amount": amount})
        assert problem["field"] == "amount", problem
    hold = await api.call("GET", url, scope="runtime")
    assert (hold["status"], hold["amount"], hold["captured"]) == ("held", "2.00", None)


async def test_a_rejected_threshold_keeps_the_one_set(api: Api, world: World) -> None:
    path = f"/v1/accounts/{world.account}/thresholds/{world.credit_type}"
    for low in ("0.001", "0", "-5"):
        problem = await api.call("PUT", path, expect=422, json={"low": low})
        assert problem["field"] == "low", problem
    assert (await api.call("GET", f"/v1/accounts/{world.account}/thresholds"))["data"] == [
        {"account": world.account, "credit_type": world.credit_type, "low": "5.00"}]


async def test_a_measurement_with_no_credit_type_to_draw_stores_nothing(
        api: Api, world: World, db: asyncpg.Connection) -> None:
    """The account's plan rates the measurement, but there is nothing to draw it from: the
    measurement is refused, alone and in a batch, and not stored."""
    bare_id = await db.fetchval("SELECT id FROM accounts WHERE code = $1", world.bare)

    def one(account: str) -> dict[str, Any]:
        return {"uid": uuid.uuid4().hex, "account": account, "meter": world.meter,
                "timestamp": now_iso(), "data": {"gb": 5, "files": 1, "seconds": 1}}

    alone = one(world.bare)
    problem = await api.call("POST", "/v1/measurements", scope="runtime", expect=422, json=alone)
    assert problem["field"] == "account", problem
    # in a batch, each is refused on its own: the measurement beside them is taken
    neighbour = one(world.account)
    batch = await api.call("POST", "/v1/measurements", scope="runtime",
                           json={"measurements": [one(world.bare), neighbour, one(world.bare)]})
    assert [r["status"] for r in batch["results"]] == ["rejected", "unrated", "rejected"]
    assert [r["error"]["field"] for r in batch["results"] if r["error"]] == [
        "measurements.0.account", "measurements.2.account"]
    await api.call("GET", f"/v1/accounts/{world.account}/measurements/{neighbour['uid']}")
    assert await db.fetchval("SELECT count(*) FROM measurements WHERE account_id = $1",
                             bare_id) == 0
    assert await db.fetchval("SELECT count(*) FROM rated_debits WHERE account_id = $1",
                             bare_id) == 0
    await api.call("GET", f"/v1/accounts/{world.bare}/measurements/{alone['uid']}", expect=404)


async def test_a_dimension_of_200_characters_is_taken(api: Api, world: World) -> None:
    """The other side of the 201-character case: the limit itself is a valid dimension."""
    made = await api.call("POST", "/v1/measurements", scope="runtime", json={
        "uid": uuid.uuid4().hex, "account": world.account, "meter": world.meter,
        "timestamp": now_iso(), "data": {"gb": 1, "files": 1, "seconds": 1, "region": "x" * 200}})
    assert made["status"] == "unrated"


async def test_usage_in_a_batch_for_an_account_with_no_credit_type_is_rejected_alone(
        api: Api, world: World, db: asyncpg.Connection) -> None:
    bare_id = await db.fetchval("SELECT id FROM accounts WHERE code = $1", world.bare)
    events = [{"uid": uuid.uuid4().hex, "account": account, "product": world.api, "amount": "0.01",
               "timestamp": now_iso()} for account in (world.bare, world.account)]
    out = await api.call("POST", "/v1/usage", scope="runtime", json={"events": events})
    assert [r["status"] for r in out["results"]] == ["rejected", "accepted"]
    assert out["results"][0]["error"]["field"] == "events.0.credit_type"
    assert await db.fetchval("SELECT count(*) FROM usage_events WHERE account_id = $1",
                             bare_id) == 0
