"""Rating configuration API: meters, aggregations, counters, plans, pricings; bad input."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.conftest import Api


def _code(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def fiat_usd(api: Api) -> str:
    """A new fiat credit type (US dollars, 2 places) for plans priced in a currency other than
    the account's credits; its code."""
    code = _code("usd")
    await api.call("POST", "/v1/credit-types", expect=201, json={
        "code": code, "name": "US dollar", "kind": "fiat", "decimal_places": 2})
    return code


async def meter(api: Api, product: str | None = None, **extra: Any) -> str:
    code = _code("meter")
    await api.call("POST", "/v1/meters", expect=201, json={
        "code": code, "name": "Files", "product": product, "data_fields": [
            {"code": "gb", "category": "measure"}, {"code": "files", "category": "measure"},
            {"code": "seconds", "category": "measure"}, {"code": "region", "category": "where"}],
        "derived_fields": [{"code": "per_file", "expression": "seconds / files"}], **extra})
    return code


def _problem(body: dict[str, Any], field: str) -> None:
    assert body["field"] == field and body["type"].startswith("https://"), body


async def test_meter_round_trip(api: Api) -> None:
    names = await api.setup()
    code = await meter(api, names["storage"])
    got = await api.call("GET", f"/v1/meters/{code}")
    assert got["product"] == names["storage"]
    assert got["derived_fields"] == [{"code": "per_file", "expression": "seconds / files"}]
    page = await api.call("GET", "/v1/meters", params={"limit": 500})
    assert code in [m["code"] for m in page["data"]]


@pytest.mark.parametrize(("derived", "field"), [
    ({"code": "x", "expression": "gb +"}, "derived_fields.0.expression"),
    ({"code": "x", "expression": "nope * 2"}, "derived_fields.0.expression"),
    ({"code": "x", "expression": "region * 2"}, "derived_fields.0.expression"),
    ({"code": "gb", "expression": "1"}, "derived_fields.0.code"),
])
async def test_bad_derived_fields_name_the_field(api: Api, derived: dict[str, str],
                                                 field: str) -> None:
    body = await api.call("POST", "/v1/meters", expect=422, json={
        "code": _code("m"), "name": "m", "data_fields": [
            {"code": "gb", "category": "measure"}, {"code": "region", "category": "where"}],
        "derived_fields": [derived]})
    _problem(body, field)


async def test_unknown_fields_are_refused(api: Api) -> None:
    body = await api.call("POST", "/v1/meters", expect=422, json={
        "code": _code("m"), "name": "m", "data_fields": [{"code": "gb", "category": "measure"}],
        "colour": "red"})
    _problem(body, "colour")


async def test_aggregation_targets_a_numeric_field_and_segments_by_a_dimension(api: Api) -> None:
    code = await meter(api)
    base = {"name": "a", "meter": code, "function": "SUM"}
    _problem(await api.call("POST", "/v1/aggregations", expect=422, json={
        **base, "code": _code("a"), "target_field": "region"}), "target_field")
    _problem(await api.call("POST", "/v1/aggregations", expect=422, json={
        **base, "code": _code("a"), "target_field": "gb", "segment_field": "files"}),
        "segment_field")
    _problem(await api.call("POST", "/v1/aggregations", expect=422, json={
        **base, "code": _code("a"), "target_field": "gb", "quantity_per_unit": "0"}),
        "quantity_per_unit")
    made = await api.call("POST", "/v1/aggregations", expect=201, json={
        **base, "code": _code("a"), "target_field": "gb", "quantity_per_unit": "1.5",
        "rounding": "up", "segment_field": "region"})
    assert made["quantity_per_unit"] == "1.5"
    await api.call("POST", "/v1/aggregations", expect=201, json={
        **base, "code": _code("a"), "target_field": "region", "function": "UNIQUE"})


async def plan(api: Api, product: str, currency: str, **template: Any) -> str:
    code = _code("tpl")
    await api.call("POST", "/v1/plan-templates", expect=201, json={
        "code": code, "name": "t", "product": product, "bill_frequency": "monthly",
        "currency": currency, **template})
    plan_code = _code("plan")
    await api.call("POST", "/v1/plans", expect=201,
                   json={"code": plan_code, "name": "p", "template": code})
    return plan_code


async def test_pricing_bands_and_overlaps(api: Api) -> None:
    names = await api.setup()
    plan_code = await plan(api, names["storage"], names["credit_type"], standing_charge="5")
    got = await api.call("GET", f"/v1/plans/{plan_code}")
    assert got["standing_charge"] == "5"
    aggregation = _code("a")
    await api.call("POST", "/v1/aggregations", expect=201, json={
        "code": aggregation, "name": "a", "meter": await meter(api), "target_field": "gb",
        "function": "SUM"})
    pricing = {"plan": plan_code, "aggregation": aggregation, "start_date": "2024-07-01",
               "end_date": "2025-07-01", "type": "tiered",
               "bands": [{"up_to": "100", "price": "0.5"}, {"up_to": None, "price": "0.4"}]}
    _problem(await api.call("POST", "/v1/pricings", expect=422, json={
        **pricing, "bands": [{"up_to": "100", "price": "1"}, {"up_to": "50", "price": "1"},
                             {"up_to": None, "price": "1"}]}), "bands")
    _problem(await api.call("POST", "/v1/pricings", expect=422, json={
        **pricing, "bands": [{"up_to": "100", "price": "1"}]}), "bands")
    _problem(await api.call("POST", "/v1/pricings", expect=422, json={
        **pricing, "end_date": "2024-06-01"}), "end_date")
    _problem(await api.call("POST", "/v1/pricings", expect=422, json={
        **pricing, "counter": "x"}), "aggregation")
    await api.call("POST", "/v1/pricings", expect=201, json=pricing)
    _problem(await api.call("POST", "/v1/pricings", expect=409, json={
        **pricing, "start_date": "2025-01-01", "end_date": None}), "start_date")
    await api.call("POST", "/v1/pricings", expect=201, json={
        **pricing, "start_date": "2025-07-01", "end_date": None})
    listed = await api.call("GET", "/v1/pricings", params={"plan": plan_code})
    assert [p["start_date"] for p in listed["data"]] == ["2024-07-01", "2025-07-01"]


async def test_account_plans_do_not_overlap_for_one_product(api: Api) -> None:
    names = await api.setup()
    plan_code = await plan(api, names["storage"], names["credit_type"])
    path = f"/v1/accounts/{names['account']}/plans"
    await api.call("POST", path, expect=201, json={"plan": plan_code, "start_date": "2024-07-01",
                                                   "end_date": "2024-08-01"})
    _problem(await api.call("POST", path, expect=409, json={
        "plan": plan_code, "start_date": "2024-07-15"}), "start_date")
    _problem(await api.call("POST", path, expect=422, json={
        "plan": "no-such-plan", "start_date": "2024-07-15"}), "plan")
    assert len((await api.call("GET", path))["data"]) == 1


async def test_conversion_rate_needs_a_fiat(api: Api) -> None:
    names = await api.setup()
    custom = await api.setup(credit_type="tokens", decimal_places=0)
    path = f"/v1/credit-types/{custom['credit_type']}/conversion-rates"
    _problem(await api.call("POST", path, expect=422, json={
        "fiat": custom["credit_type"], "effective": "2024-01-01", "rate": "0.01"}), "fiat")
    _problem(await api.call("POST", path, expect=422, json={
        "fiat": names["credit_type"], "effective": "2024-01-01", "rate": "0"}), "rate")
    await api.call("POST", path, json={"fiat": names["credit_type"], "effective": "2024-01-01",
                                       "rate": "0.01"})
