"""The ASGI app: routes from every domain, shared clients built in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from app import openapi
from app.auth.endpoints import ENDPOINTS as TOKENS
from app.config.catalog import Catalog
from app.config.endpoints import ENDPOINTS as CONFIG
from app.context import AppContext
from app.db import create_pool, pending_migrations
from app.entitlements.endpoints import ENDPOINTS as RUNTIME
from app.errors import STORE_ERRORS, NotFound, Problem, internal_error, problem_response
from app.hotstate.checkcache import CheckCache
from app.hotstate.keys import Keys
from app.hotstate.resp import FastRedis
from app.hotstate.store import HotState
from app.http import ADMIN, DirectRoutes, Endpoint, KeyCache, to_routes
from app.ledger.endpoints import ENDPOINTS as LEDGER
from app.ledger.journal import Journal
from app.ledger.loader import Loader
from app.metrics import MEDIA_TYPE as METRICS_MEDIA_TYPE
from app.metrics import metrics
from app.observe import Observed
from app.purchases.endpoints import ENDPOINTS as PURCHASES
from app.purchases.stripe_gateway import StripeGateway
from app.rating.endpoints import ENDPOINTS as RATING
from app.rating.endpoints import RUNTIME_ENDPOINTS as MEASUREMENTS
from app.recharge.endpoints import ENDPOINTS as RECHARGE
from app.settings import Settings
from app.webhooks.dispatcher import DispatchConfig, Dispatcher
from app.webhooks.endpoints import ENDPOINTS as WEBHOOKS
from app.workers import run_workers

log = logging.getLogger(__name__)
# the hot path first: Starlette tries routes in order
ENDPOINTS: list[Endpoint] = [*RUNTIME, *MEASUREMENTS, *CONFIG, *LEDGER, *WEBHOOKS, *PURCHASES,
                             *RATING, *RECHARGE, *TOKENS,
                             Endpoint("GET", "/metrics", metrics, ADMIN,
                                      "This process's figures, in the Prometheus text format",
                                      "operations", media_type=METRICS_MEDIA_TYPE)]


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    checks: dict[str, Any] = {}
    try:
        async with ctx.pool.acquire() as conn:
            pending = await pending_migrations(conn, ctx.settings.migrations_dir)
        checks["postgres"] = "ok"
        checks["migrations"] = "current" if not pending else {"pending": pending}
    except STORE_ERRORS as exc:
        checks["postgres"] = f"unreachable: {type(exc).__name__}"
    try:
        await ctx.redis.ping()
        checks["redis"] = "ok"
    except STORE_ERRORS as exc:
        checks["redis"] = f"unreachable: {type(exc).__name__}"
    ready = checks.get("postgres") == "ok" and checks.get("redis") == "ok" \
        and checks.get("migrations") == "current"
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


async def openapi_json(request: Request) -> Response:
    return Response(request.app.state.openapi, media_type="application/json")


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return problem_response(NotFound("no such route", field="path"))
    problem = Problem(str(exc.detail))
    problem.status, problem.code, problem.title = exc.status_code, "http_error", str(exc.detail)
    response = problem_response(problem)
    response.headers.update(exc.headers or {})  # a 405's Allow (RFC 9110: it must list them)
    return response


async def server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return problem_response(internal_error())


class App(Starlette):
    """Starlette, with the exact-path declared endpoints (the runtime hot path among them)
    dispatched by one dict lookup before the middleware stack (`DirectRoutes`)."""

    direct: DirectRoutes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        target = self.direct.find(scope)
        if target is None:
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self
        await target(scope, receive, send)


# Young-generation collections every 100,000 allocations instead of 700, and the objects built
# at start-up frozen out of every collection: a batch of 1,000 events allocates tens of
# thousands of short-lived objects, and with the default thresholds the collector (mostly its
# full passes over every live object) took ~40% of a batch's CPU. Reference counting still
# frees nearly everything at once; only cycles wait for the rarer collections.
GC_THRESHOLDS = (100_000, 50, 1000)


def on_stop_signals(stopping: asyncio.Event) -> Callable[[], None]:
    """Set `stopping` as soon as the process is told to stop (SIGTERM, SIGINT), before the
    server's graceful drain: the server waits for open answers before the lifespan ends, so
    without this a balance stream would hold a shutdown for its whole lifetime.

    Only where the event loop's server already handles the signal (a Python-level handler is
    installed: asyncio's `add_signal_handler`, as granian's workers do): that handler is kept
    and called, and the loop's own dispatch through its wakeup fd still runs. Elsewhere (a test
    process, default handlers) nothing changes. Returns what puts the handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        handler = signal.getsignal(sig)
        if not callable(handler) or handler is signal.default_int_handler:
            continue

        def chained(signum: int, frame: Any, prior: Any = handler) -> None:
            loop.call_soon_threadsafe(stopping.set)
            prior(signum, frame)

        previous[sig] = handler
        signal.signal(sig, chained)

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return restore


def tune_gc() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings.from_env()
    observed = Observed() if settings.request_metrics else None

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pool = await create_pool(settings.database_url, settings.db_pool_size)
        # a blocking pool waits for a free connection instead of failing at max_connections
        redis = aioredis.Redis.from_pool(aioredis.BlockingConnectionPool.from_url(
            settings.redis_url, decode_responses=True, max_connections=64, timeout=5))
        fast = FastRedis(settings.redis_url)
        hot = HotState(redis, fast, Keys(settings.redis_prefix))
        if settings.check_cache:
            hot.cache = CheckCache(settings.redis_url, fast, settings.check_cache_ttl_ms)
            await hot.cache.start()
        journal = Journal(pool, hot, copy_from_rows=settings.journal_copy_rows)
        ctx = AppContext(settings, pool, redis, hot, Catalog(pool),
                         KeyCache(settings.token_secrets_ttl_s), journal,
                         Loader(pool, hot))
        ctx.stripe = StripeGateway.from_settings(settings)
        ctx.observed = observed
        app.state.ctx = ctx
        restore_signals = on_stop_signals(ctx.closing)
        journal.start()
        tune_gc()
        workers = asyncio.create_task(run_workers(ctx)) if settings.run_workers else None
        webhooks = Dispatcher(pool, DispatchConfig.from_settings(settings),
                              listen_dsn=settings.database_url) \
            if settings.run_workers and settings.webhooks_dispatch else None
        if webhooks:
            webhooks.start()
            ctx.dispatcher = webhooks
        try:
            yield
        finally:
            ctx.closing.set()
            restore_signals()
            if workers:
                # redis-py sometimes swallows a CancelledError (one landing inside its
                # read timeout): a single cancel could leave shutdown waiting forever
                while not workers.done():
                    workers.cancel()
                    await asyncio.wait([workers], timeout=1.0)
                with contextlib.suppress(asyncio.CancelledError):
                    await workers
            if webhooks:
                await webhooks.stop()
            await journal.stop()
            if ctx.stripe:
                await ctx.stripe.close()
            if hot.cache is not None:
                await hot.cache.close()
            await fast.aclose()
            await redis.aclose()
            await pool.close()

    max_body = settings.max_body_bytes
    routes = [*to_routes(ENDPOINTS, observed, max_body), Route("/healthz", healthz),
              Route("/readyz", readyz), Route("/openapi.json", openapi_json)]
    app = App(routes=routes, lifespan=lifespan,
              exception_handlers={HTTPException: http_error, Exception: server_error})
    app.direct = DirectRoutes(ENDPOINTS, observed, max_body)
    app.state.openapi = json.dumps(openapi.build(ENDPOINTS))
    return app


def create_app_from_env() -> Starlette:
    logging.basicConfig(level=logging.INFO)
    return create_app(Settings.from_env())
