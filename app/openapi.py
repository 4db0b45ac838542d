"""The OpenAPI document, generated from the declared endpoints and their pydantic models."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from app.entitlements.schemas import HOLD_UID_PATTERN
from app.http import Endpoint
from app.schemas import CODE_PATTERN, UID_PATTERN

REF = "#/components/schemas/{model}"
PROBLEM = {"$ref": "#/components/schemas/Problem"}
PROBLEM_SCHEMA = {
    "type": "object",
    "required": ["type", "title", "status", "code", "detail"],
    "properties": {
        "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
        "code": {"type": "string"}, "detail": {"type": "string"}, "field": {"type": "string"},
        "errors": {"type": "array", "items": {"type": "object"}},
    },
}


def _models(endpoints: list[Endpoint]) -> list[type[BaseModel]]:
    seen: list[type[BaseModel]] = []
    for e in endpoints:
        for model in (e.body, e.response):
            if model is not None and model not in seen:
                seen.append(model)
    return seen


# What a path parameter is: a row's numeric id (read by `Call.path_id`: 1 to 18 digits), a
# client's uid (a usage event's, a hold's, a measurement's), or else a code (an event's id too).
_ROW_ID = {"type": "integer", "minimum": 1, "maximum": 10**18 - 1}
PATH_PARAMETERS: dict[str, dict[str, Any]] = {
    "balance_id": _ROW_ID, "delivery_id": _ROW_ID, "endpoint_id": _ROW_ID, "id": _ROW_ID,
    "purchase_id": _ROW_ID, "uid": {"type": "string", "pattern": UID_PATTERN}}
_CODE = {"type": "string", "pattern": CODE_PATTERN}
_HOLD_UID = {"type": "string", "pattern": HOLD_UID_PATTERN}  # a hold's uid is 3 shorter


def _path_schema(path: str, name: str) -> dict[str, Any]:
    if name == "uid" and "/holds/" in path:
        return _HOLD_UID
    return PATH_PARAMETERS.get(name, _CODE)


def _parameters(endpoint: Endpoint) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True,
         "schema": _path_schema(endpoint.path, name)}
        for name in re.findall(r"{(\w+)}", endpoint.path)
    ]
    if endpoint.query is not None:
        schema = endpoint.query.model_json_schema()
        required = set(schema.get("required", []))
        for name, prop in schema["properties"].items():
            prop = {k: v for k, v in prop.items() if k != "title"}
            if "anyOf" in prop:  # optional: describe the non-null form
                prop = next(p for p in prop["anyOf"] if p.get("type") != "null")
            params.append({"name": name, "in": "query", "required": name in required,
                           "schema": prop})
    if endpoint.idempotent_write:
        params.append({"name": "Idempotency-Key", "in": "header",
                       "required": endpoint.idempotency_required,
                       "schema": {"type": "string", "minLength": 1, "maxLength": 255}})
    return params


def _event(data: dict[str, Any]) -> dict[str, Any]:
    """One server-sent event as a parser yields it: its fields, `data` JSON text of `data`."""
    return {"type": "object", "required": ["data"], "properties": {
        "event": {"type": "string"},
        "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": data},
        "id": {"type": "string"},
        "retry": {"type": "integer", "minimum": 0}}}


def _operation(endpoint: Endpoint, refs: dict[Any, Any]) -> dict[str, Any]:
    problem = {"description": "problem", "content": {"application/problem+json": {"schema": PROBLEM}}}
    success: dict[str, Any] = {
        "description": "success",
        "content": {"application/json": {
            "schema": refs[(endpoint.response, "serialization")]}} if endpoint.response else {},
    }
    if endpoint.media_type == "text/event-stream" and endpoint.response:
        # before Open API 3.2's `itemSchema`, the schema of an event stream is that of one event
        success["content"] = {endpoint.media_type: {"schema": _event(
            refs[(endpoint.response, "serialization")])}}
        success["description"] = (f"server-sent events, each `event: balances` whose data is "
                                  f"a {endpoint.response.__name__} as JSON")
    elif endpoint.media_type != "application/json":  # text, not a model (metrics)
        success["content"] = {endpoint.media_type: {"schema": {"type": "string"}}}
    responses: dict[str, Any] = {str(status): success for status in (endpoint.status, *endpoint.also)}
    responses |= {"4XX": problem, "503": problem}
    op: dict[str, Any] = {
        "summary": endpoint.summary,
        "operationId": endpoint.handler.__module__.split(".")[1] + "_" + endpoint.handler.__name__,
        "tags": [endpoint.tag],
        "parameters": _parameters(endpoint),
        "responses": responses,
    }
    if endpoint.scopes:
        op["security"] = [{"bearer": []}]
        op["description"] = "Scopes: " + ", ".join(sorted(s.value for s in endpoint.scopes))
    if endpoint.body is not None:
        # a body whose fields are all optional may be left out (it is read as {})
        required = any(f.is_required() for f in endpoint.body.model_fields.values())
        op["requestBody"] = {"required": required, "content": {"application/json": {
            "schema": refs[(endpoint.body, "validation")]}}}
    return op


def build(endpoints: list[Endpoint]) -> dict[str, Any]:
    models = _models(endpoints)
    pairs = [(m, mode) for m in models for mode in ("validation", "serialization")]
    refs, defs = models_json_schema(pairs, ref_template=REF)  # type: ignore[arg-type]
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in endpoints:
        paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = _operation(endpoint, refs)
    schemas = dict(defs.get("$defs", {}))
    schemas["Problem"] = PROBLEM_SCHEMA
    return {
        "openapi": "3.1.0",
        "info": {"title": "creditgate", "version": "1", "description":
                 "Prepaid-credit entitlement gateway: check, usage, balances and the ledger."},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description":
                       "An API key (scope admin or runtime), or on the routes of scope "
                       "customer a customer token (`cgct_…`) of the account in the path"}}},
    }
