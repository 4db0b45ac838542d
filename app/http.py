"""Declared endpoints: each route states its scope and its pydantic bodies.

The same declarations build the Starlette routes, the OpenAPI document and the route-walking
auth test, so the three cannot drift apart.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl

from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Send
from starlette.types import Scope as Scope_

from app import audit
from app.auth.keys import Principal, Scope, find_principal, key_alive
from app.auth.tokens import PREFIX as TOKEN_PREFIX
from app.auth.tokens import SECRETS_TTL_S, CustomerTokens, TokenRefused
from app.errors import (
    STORE_ERRORS,
    BodyTooLarge,
    Forbidden,
    MalformedBody,
    NotFound,
    Problem,
    Unauthenticated,
    Unavailable,
    ValidationProblem,
    field_path,
    internal_error,
    problem_response,
)
from app.observe import Observed, RouteStats
from app.settings import Seconds, Settings

if TYPE_CHECKING:
    from app.context import AppContext

ADMIN = frozenset({Scope.admin})
RUNTIME = frozenset({Scope.runtime})
READ = frozenset({Scope.admin, Scope.runtime})
# what an account's own customer may read too, with a customer token (app/auth/tokens.py)
CUSTOMER_READ = frozenset({Scope.admin, Scope.runtime, Scope.customer})
PUBLIC: frozenset[Scope] = frozenset()

KEY_CACHE_TTL_S = 30.0
log = logging.getLogger(__name__)


@dataclass
class Call:
    """What a handler gets: the parsed request and the app's shared clients."""

    request: Incoming
    ctx: AppContext
    principal: Principal | None
    body: Any = None
    query: Any = None

    def path(self, name: str) -> str:
        return str(self.request.path_params[name])

    def path_id(self, name: str, what: str) -> int:
        """A numeric id from the path; one that no row can have (not 1 to 18 digits, or 0) is
        a 404 naming the parameter."""
        raw = self.path(name)
        if not raw.isdigit() or len(raw) > 18 or int(raw) == 0:
            raise NotFound(f"no {what} {raw!r}", field=name)
        return int(raw)


Handler = Callable[[Call], Awaitable[BaseModel | Response]]


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    handler: Handler
    scopes: frozenset[Scope]
    summary: str
    tag: str
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    # the handler parses the JSON itself (per-item errors); `body` is then for the docs only
    raw_body: bool = False
    # other success statuses the handler may answer with (documented like `status`)
    also: tuple[int, ...] = ()
    # an admin write that must not run without an `Idempotency-Key` (it charges money)
    idempotency_required: bool = False
    # its answer holds a credential: never stored for an `Idempotency-Key` replay (such a
    # route changes nothing, so a retry is safe without one)
    secret_answer: bool = False
    # what a success is sent as (text/event-stream: a stream of server-sent events)
    media_type: str = "application/json"
    # a customer token may come as the `access_token` query parameter (for EventSource)
    token_in_query: bool = False

    def __post_init__(self) -> None:
        # a customer token reads one account: its routes name that account in the path
        if Scope.customer in self.scopes and not (
                self.method == "GET" and self.path.startswith("/v1/accounts/{code}/")):
            raise ValueError(f"{self.method} {self.path}: a customer route is a GET under "
                             "/v1/accounts/{code}/")

    @property
    def idempotent_write(self) -> bool:
        return self.method in ("POST", "PATCH", "PUT") and Scope.admin in self.scopes \
            and not self.secret_answer

    @property
    def audited(self) -> bool:
        """In the audit trail (app/audit.py): the same writes, whichever key makes them (minting
        a customer token changes nothing and runs on every page view: not audited)."""
        return self.idempotent_write


def validation_problem(exc: ValidationError, prefix: tuple[str, ...] = ()) -> Problem:
    errors = [
        {"field": field_path(prefix + tuple(e["loc"])), "message": e["msg"], "type": e["type"]}
        for e in exc.errors(include_url=False, include_context=False, include_input=False)
    ]
    if any(e["type"] == "json_invalid" for e in errors):
        return MalformedBody("request body is not valid JSON", field="body")
    first = errors[0]
    return ValidationProblem(f"{first['field']}: {first['message']}", field=first["field"],
                             errors=errors)


M = TypeVar("M", bound=BaseModel)


@functools.cache
def _list_adapter(model: type[BaseModel]) -> TypeAdapter[list[Any]]:
    return TypeAdapter(list[model])  # type: ignore[valid-type]


def validate_items(model: type[M], items: list[Any]) -> list[M | Problem]:
    """A batch in one pydantic call; only a batch with an error is validated item by item, so
    each bad item gets its own problem and the good ones stand."""
    try:
        return list(_list_adapter(model).validate_python(items))
    except ValidationError:
        pass
    checked: list[M | Problem] = []
    for raw in items:
        try:
            checked.append(model.model_validate(raw))
        except ValidationError as exc:
            checked.append(validation_problem(exc))
    return checked


def batch_of(body: Any, key: str, limit: int) -> list[Any] | None:
    """The items of a batch body `{key: [...]}` (1 to `limit` of them, nothing beside); None
    when the body is a single item."""
    if not (isinstance(body, dict) and key in body):
        return None
    items = body[key]
    if set(body) != {key}:
        raise ValidationProblem(f"only `{key}` is allowed beside a batch",
                                field=sorted(set(body) - {key})[0])
    if not isinstance(items, list) or not items:
        raise ValidationProblem(f"must be a non-empty list of {key}", field=key)
    if len(items) > limit:
        raise ValidationProblem(f"at most {limit} {key} per batch", field=key)
    return items


class KeyCache:
    """Known keys are cached briefly so the hot path does not hit Postgres; revocation lags by
    at most KEY_CACHE_TTL_S. Customer tokens are checked here too (`tokens`), each against
    the liveness of the key that minted it, cached the same way, and against its signing
    secret, whose retirement `tokens` reads within `token_secrets_ttl_s`."""

    def __init__(self, token_secrets_ttl_s: Seconds = SECRETS_TTL_S) -> None:
        self._known: dict[str, tuple[Principal, float]] = {}
        self._alive: dict[int, tuple[bool, float]] = {}
        # token: (principal, expiry s, id of the secret that signed it)
        self._tokens: dict[str, tuple[Principal, int, int]] = {}
        self.tokens = CustomerTokens(token_secrets_ttl_s)

    def _known_alive(self, key_id: int) -> bool | None:
        """Whether a key is alive, when cached and fresh; None: ask `alive`."""
        hit = self._alive.get(key_id)
        return hit[0] if hit is not None and hit[1] > time.monotonic() else None

    async def alive(self, ctx: AppContext, key_id: int) -> bool:
        known = self._known_alive(key_id)
        if known is not None:
            return known
        found = await key_alive(ctx.pool, key_id)
        if len(self._alive) > 10_000:
            self._alive.clear()
        self._alive[key_id] = (found, time.monotonic() + KEY_CACHE_TTL_S)
        return found

    def _checked(self, token: str) -> Principal | None:
        """A customer token checked before, not expired since, and whose secret still verifies
        by a copy of the secrets no older than their refresh bound (remembering tokens saves
        decoding and an HMAC per request; a retired secret ends them within that bound)."""
        hit = self._tokens.get(token)
        return hit[0] if hit is not None and hit[1] > time.time() and \
            self.tokens.accepts(hit[2]) else None

    def cached_customer(self, token: str) -> Principal | None:
        """A customer token's principal when it was checked before, has not expired, its
        secret is known to verify and its key to be alive (no coroutine); None: ask
        `customer`."""
        principal = self._checked(token)
        return principal if principal is not None and self._known_alive(principal.key_id) \
            else None

    async def customer(self, ctx: AppContext, token: str) -> Principal:
        """A customer token's principal; 401 when it is forged, expired, its key revoked or its
        secret retired."""
        principal = self._checked(token)
        if principal is None:
            try:
                principal, expires, secret_id = await self.tokens.principal(ctx.pool, token)
            except TokenRefused as exc:
                self._tokens.pop(token, None)
                raise Unauthenticated(str(exc), field="Authorization") from exc
            if len(self._tokens) > 10_000:
                self._tokens.clear()
            self._tokens[token] = (principal, expires, secret_id)
        if not await self.alive(ctx, principal.key_id):
            raise Unauthenticated("the key that issued this customer token was revoked",
                                  field="Authorization")
        return principal

    def cached(self, key: str) -> Principal | None:
        """The key's principal when cached and fresh (no coroutine); None: ask `principal`."""
        hit = self._known.get(key)
        return hit[0] if hit and hit[1] > time.monotonic() else None

    async def principal(self, ctx: AppContext, key: str) -> Principal | None:
        cached = self.cached(key)
        if cached is not None:
            return cached
        found = await find_principal(ctx.pool, key)
        if found:
            if len(self._known) > 10_000:
                self._known.clear()
            self._known[key] = (found, time.monotonic() + KEY_CACHE_TTL_S)
        return found


async def authenticate(ctx: AppContext, request: Incoming, scopes: frozenset[Scope],
                       token_in_query: bool = False) -> Principal:
    header = request.header(b"authorization") or ""
    if not header and token_in_query and (token := request.query_params.get("access_token")):
        # a browser's EventSource cannot send headers: a customer token (short-lived, read
        # only) may travel in the URL of such a route; an API key never does
        if not token.startswith(TOKEN_PREFIX):
            raise Unauthenticated("only a customer token may be sent as access_token; send an "
                                  "API key as `Authorization: Bearer <key>`", field="access_token")
        header = f"Bearer {token}"
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key:
        raise Unauthenticated("send `Authorization: Bearer <api key>`", field="Authorization")
    key = key.strip()
    if key.startswith(TOKEN_PREFIX):
        principal: Principal | None = ctx.keys.cached_customer(key) or \
            await ctx.keys.customer(ctx, key)
    else:
        principal = ctx.keys.cached(key) or await ctx.keys.principal(ctx, key)
    if principal is None:
        raise Unauthenticated("unknown or revoked API key", field="Authorization")
    if principal.scope not in scopes:
        allowed = " or ".join(sorted(s.value for s in scopes))
        raise Forbidden(f"this route needs a key with scope {allowed}", field="Authorization")
    if principal.account is not None and request.path_params.get("code") != principal.account:
        raise Forbidden(f"this customer token reads account {principal.account!r} only",
                        field="Authorization")
    return principal


class JSONBytes(Response):
    """A serialised JSON body with its two headers built directly (Starlette's generic
    `init_headers` costs more than the rest of a small response)."""

    media_type = "application/json"

    def __init__(self, body: bytes, status_code: int = 200) -> None:
        self.status_code = status_code
        self.body = body
        self.background = None
        self.raw_headers = [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]


def render(result: BaseModel | Response, status: int) -> Response:
    if isinstance(result, Response):
        return result
    return JSONBytes(result.__pydantic_serializer__.to_json(result), status)


async def parse_call(endpoint: Endpoint, request: Incoming, ctx: AppContext) -> Call:
    principal = None
    if endpoint.scopes:
        principal = await authenticate(ctx, request, endpoint.scopes, endpoint.token_in_query)
    call = Call(request, ctx, principal)
    for name, value in request.path_params.items():
        if "\x00" in str(value):  # Postgres text cannot hold NUL: nothing by that name exists
            raise NotFound("no such resource: the path holds a NUL character", field=name)
    if endpoint.query is not None:
        params = dict(request.query_params)
        _reject_nul(params, ("query",))
        try:
            call.query = endpoint.query.model_validate(params)
        except ValidationError as exc:
            raise validation_problem(exc, ("query",)) from exc
    if endpoint.body is not None or endpoint.raw_body:
        raw = await request.body() or b"{}"
        data = loads(raw)
        if endpoint.raw_body:
            call.body = data
        else:
            assert endpoint.body is not None
            try:
                if b"\\u0000" in raw:  # cheap test first: JSON can only spell NUL as an escape
                    _reject_nul(data)
                call.body = endpoint.body.model_validate(data)
            except ValidationError as exc:
                raise validation_problem(exc) from exc
            except RecursionError as exc:  # parsed, but too deep to walk (from Python 3.12
                raise _too_deep() from exc  # the parser's C recursion goes deeper than ours
    return call


def _too_deep() -> MalformedBody:
    return MalformedBody("request body is nested too deeply", field="body")


def _find_nul(value: Any, path: tuple[int | str, ...]) -> tuple[int | str, ...] | None:
    if isinstance(value, str):
        return path if "\x00" in value else None
    items = value.items() if isinstance(value, dict) else enumerate(value) \
        if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and "\x00" in key:
            return (*path, key)
        found = _find_nul(item, (*path, key))
        if found is not None:
            return found
    return None


def _reject_nul(data: Any, prefix: tuple[int | str, ...] = ()) -> None:
    """Postgres text cannot hold a NUL character: refuse it here rather than fail in SQL."""
    path = _find_nul(data, prefix)
    if path is not None:
        raise ValidationProblem("may not contain a NUL character", field=field_path(path))


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not a number")


# one decoder for the process: json.loads(..., parse_float=...) would build one per call
_DECODER = json.JSONDecoder(parse_float=Decimal, parse_constant=_no_constants)


def loads(raw: bytes) -> Any:
    """Parse JSON with every fraction as an exact Decimal: no amount ever passes a float."""
    try:
        return _DECODER.decode(raw.decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedBody("request body is not valid JSON", field="body") from exc
    except RecursionError as exc:  # arrays or objects nested deeper than the parser goes
        raise _too_deep() from exc


def request_fingerprint(request: Incoming, raw: bytes) -> bytes:
    return hashlib.sha256(f"{request.method} {request.path}\n".encode() + raw).digest()


class Incoming:
    """What handlers read of a request: a lighter stand-in for Starlette's Request, built once
    from the ASGI scope (the runtime routes answer thousands of these a second)."""

    __slots__ = ("_body", "_headers", "_query", "_raw_headers", "app", "method", "path",
                 "path_params")

    def __init__(self, scope: Scope_, body: bytes) -> None:
        self.app = scope["app"]
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.path_params: dict[str, Any] = scope.get("path_params", {})
        self._raw_headers: list[tuple[bytes, bytes]] = scope["headers"]
        self._headers: dict[str, str] | None = None
        self._body = body
        self._query: bytes = scope.get("query_string", b"")

    def header(self, name: bytes) -> str | None:
        """One header by its lower-case name (ASGI names are lower case), without decoding
        the others."""
        for key, value in self._raw_headers:
            if key == name:
                return value.decode("latin-1")
        return None

    @property
    def headers(self) -> dict[str, str]:
        if self._headers is None:
            self._headers = {k.decode("latin-1"): v.decode("latin-1")
                             for k, v in self._raw_headers}
        return self._headers

    @property
    def query_params(self) -> dict[str, str]:
        return dict(parse_qsl(self._query.decode("latin-1"), keep_blank_values=True))

    async def body(self) -> bytes:
        return self._body


DEFAULT_MAX_BODY = Settings.max_body_bytes


async def _read_body(scope: Scope_, receive: Receive, limit: int) -> bytes | None:
    """The request body, or None when it is over `limit` bytes: refused by its Content-Length
    before anything is read, or as soon as the chunks read pass the limit (a chunked body),
    so no client can make the process hold more than `limit` of a body."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            if value.isdigit() and int(value) > limit:
                return None
            break
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


_clock = time.perf_counter_ns


class EndpointApp:
    """The ASGI app of one declared endpoint: auth, parsing, idempotency, problem+json."""

    def __init__(self, endpoint: Endpoint, stats: RouteStats | None = None,
                 max_body: int = DEFAULT_MAX_BODY) -> None:
        self.endpoint = endpoint
        # a browser calls the customer routes across origins (CREDITGATE_CORS_ORIGINS)
        self.cors = Scope.customer in endpoint.scopes
        self.stats = stats  # None: CREDITGATE_REQUEST_METRICS=0 (app/observe.py)
        self.max_body = max_body  # CREDITGATE_MAX_BODY_BYTES

    async def __call__(self, scope: Scope_, receive: Receive, send: Send) -> None:
        started = _clock()
        body = await _read_body(scope, receive, self.max_body)
        request = Incoming(scope, b"" if body is None else body)
        stats = self.stats
        try:
            if body is None:  # nothing of it parsed, authenticated or stored
                response = problem_response(BodyTooLarge(
                    f"the request body is over {self.max_body} bytes: send less at a time "
                    f"(a batch in several requests)", field="body"))
            elif self.cors and request.method == "OPTIONS":
                response, stats = preflight(request), None  # not a call of the route
            else:
                response = await self.serve(request)
        except Exception:  # a bug, not bad input: logged, answered 500 problem+json
            log.exception("unhandled error in %s %s", request.method, request.path)
            response = problem_response(internal_error())
        headers = response.raw_headers
        if self.cors:
            headers = [*headers, *cors_headers(request)]
        if isinstance(response, StreamingResponse):  # sent as it comes, until either side ends
            if stats is not None:  # timed to its start: a stream lasts as long as its reader
                stats.observe(response.status_code, _clock() - started)
            response.raw_headers = headers
            await response(scope, receive, send)
            return
        # every handler answers with a plain Response (a body in memory): sent as two ASGI
        # messages, without Starlette's Response.__call__ machinery
        await send({"type": "http.response.start", "status": response.status_code,
                    "headers": headers})
        await send({"type": "http.response.body", "body": response.body})
        if stats is not None:
            stats.observe(response.status_code, _clock() - started)

    async def serve(self, request: Incoming) -> Response:
        endpoint = self.endpoint
        ctx: AppContext = request.app.state.ctx
        audit_id = None
        try:
            call = await parse_call(endpoint, request, ctx)
            key = request.header(b"idempotency-key")
            if key is None and endpoint.idempotency_required:
                raise ValidationProblem("this route needs an Idempotency-Key header",
                                        field="Idempotency-Key")
            if endpoint.audited and call.principal is not None:  # the row first, then the change
                audit_id = await audit.begin(ctx.pool, call.principal, request.method,
                                             request.path, key, await request.body())
            if key is not None and endpoint.idempotent_write and call.principal is not None:
                from app.idempotency import run_idempotent

                fingerprint = request_fingerprint(request, await request.body())
                response = await run_idempotent(ctx, call.principal, key, fingerprint,
                                                lambda: _respond(endpoint, call))
            else:
                response = await _respond(endpoint, call)
        except Problem as problem:
            response = problem_response(problem)
        except STORE_ERRORS as exc:
            log.warning("%s %s: backing store error: %r", request.method, request.path, exc)
            response = problem_response(
                Unavailable(f"a backing store is unreachable: {type(exc).__name__}"))
        except Exception:
            await _audited(ctx, audit_id, 500)
            raise
        await _audited(ctx, audit_id, response.status_code)
        return response


async def _audited(ctx: AppContext, audit_id: int | None, status: int) -> None:
    """Complete an audit row (best effort: the change is made; a row left without its status
    says the outcome is unknown)."""
    if audit_id is None:
        return
    try:
        await audit.finish(ctx.pool, audit_id, status)
    except STORE_ERRORS as exc:
        log.warning("audit row %s left without its status: %r", audit_id, exc)


class DirectRoutes:
    """Exact-path endpoints answered ahead of Starlette's middleware and router.

    Each `EndpointApp` already turns every expected failure into problem+json, so the two
    Starlette middlewares and the router's regex walk (about a tenth of a `/v1/check`'s CPU)
    add nothing for these paths (an unexpected exception becomes a logged 500 in
    `EndpointApp`, as Starlette's handler would make it).
    Paths with parameters and everything else go through Starlette as before."""

    def __init__(self, endpoints: list[Endpoint], observed: Observed | None = None,
                 max_body: int = DEFAULT_MAX_BODY) -> None:
        self.apps = {(e.method, e.path): endpoint_app(e, observed, max_body)
                     for e in endpoints if "{" not in e.path}

    def find(self, scope: Scope_) -> EndpointApp | None:
        if scope["type"] != "http":
            return None
        return self.apps.get((scope["method"], scope["path"]))


def endpoint_app(endpoint: Endpoint, observed: Observed | None, max_body: int) -> EndpointApp:
    """An endpoint's app, counted in `observed` (None: not counted)."""
    stats = observed.route(endpoint.method, endpoint.path) if observed is not None else None
    return EndpointApp(endpoint, stats, max_body)


class PathApp:
    """The endpoints of one path, by method: one Starlette route per path, taking every method,
    so a method the path does not serve is a 405 whose `Allow` lists every one it does (RFC
    9110), also where a path with a parameter would match the URL too: `GET /v1/bills/run` is
    not the bill `run` (a bill's id is a number), and its answer says POST."""

    def __init__(self, apps: dict[str, EndpointApp]) -> None:
        self.apps = dict(apps)
        if "GET" in apps:
            self.apps.setdefault("HEAD", apps["GET"])  # HEAD is answered as GET (RFC 9110)
        cors = [app for app in apps.values() if app.cors]
        if cors:  # a customer route also answers a browser's CORS preflight
            self.apps["OPTIONS"] = cors[0]

    async def __call__(self, scope: Scope_, receive: Receive, send: Send) -> None:
        app = self.apps.get(scope["method"])
        if app is None:
            raise HTTPException(405, headers={"Allow": ", ".join(self.apps)})
        await app(scope, receive, send)


def to_routes(endpoints: list[Endpoint], observed: Observed | None = None,
              max_body: int = DEFAULT_MAX_BODY) -> list[Route]:
    by_path: dict[str, dict[str, EndpointApp]] = {}
    for endpoint in endpoints:
        by_path.setdefault(endpoint.path, {})[endpoint.method] = endpoint_app(
            endpoint, observed, max_body)
    # fewer parameters first: every request to /v1/webhook-deliveries/replay-failed is that
    # path's, whatever its method, never /v1/webhook-deliveries/{delivery_id}'s (the only
    # paths that overlap so are these literal ones beside a row's numeric id)
    return [Route(path, PathApp(by_path[path]))
            for path in sorted(by_path, key=lambda p: p.count("{"))]


def _allowed_origin(request: Incoming) -> str | None:
    """The request's Origin when CREDITGATE_CORS_ORIGINS lets it call the customer routes."""
    origin = request.header(b"origin")
    allowed = request.app.state.ctx.settings.cors_origins
    return origin if origin and ("*" in allowed or origin in allowed) else None


def cors_headers(request: Incoming) -> list[tuple[bytes, bytes]]:
    origin = _allowed_origin(request)
    if origin is None:
        return [(b"vary", b"origin")] if request.app.state.ctx.settings.cors_origins else []
    return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"origin")]


def preflight(request: Incoming) -> Response:
    """A browser asking whether it may send a customer token from another origin."""
    if _allowed_origin(request) is None:
        return problem_response(Forbidden(
            "this origin may not call the API from a browser (CREDITGATE_CORS_ORIGINS)",
            field="Origin"))
    response = Response(status_code=204)
    response.raw_headers = [(b"access-control-allow-methods", b"GET"),
                            (b"access-control-allow-headers", b"authorization"),
                            (b"access-control-max-age", b"600")]
    return response


async def _respond(endpoint: Endpoint, call: Call) -> Response:
    return render(await endpoint.handler(call), endpoint.status)
