"""`GET /metrics`: this process's figures in the Prometheus text format (version 0.0.4), for a
scraper holding an admin key (`authorization: {credentials: <key>}` in its scrape config).

Each app process answers for itself (scrape every instance), so the counters are the process's
since it started. The queue sizes read from Postgres are the deployment's, the same from every
process; they are read when scraped (a few index-only counts and one Redis PING). What the
process counts as it serves (requests by route, status and duration; checks, usage events and
measurements by outcome) is app/observe.py's.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from starlette.responses import Response

from app.entitlements import streams
from app.entitlements.history_repository import rollup_horizon
from app.errors import STORE_ERRORS
from app.observe import BUCKETS, Observed
from app.recharge.repository import IN_FLIGHT as RECHARGES_IN_FLIGHT

if TYPE_CHECKING:
    from app.context import AppContext
    from app.http import Call

MEDIA_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

# (name, help, SQL): the queues of work in Postgres, each counted through a partial index
_QUEUES = (
    ("creditgate_webhook_deliveries_pending", "webhook deliveries not yet delivered or given up",
     "SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'"),
    ("creditgate_auto_recharges_in_flight", "auto-recharges pending or being charged",
     f"SELECT count(*) FROM auto_recharges WHERE status IN {RECHARGES_IN_FLIGHT}"),
    ("creditgate_purchases_unsettled", "purchases Stripe has not settled yet",
     "SELECT count(*) FROM purchases WHERE status IN ('pending', 'granting')"),
)


def _labels(pairs: dict[str, str]) -> str:
    escaped = (f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
               for k, v in pairs.items())
    return "{" + ",".join(escaped) + "}"


def _seconds(ns: int) -> str:
    """Nanoseconds as exact decimal seconds."""
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


class Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, name: str, help_text: str, value: int | str, kind: str = "gauge") -> None:
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]

    def family(self, name: str, help_text: str, kind: str,
               samples: list[tuple[str, dict[str, str], int | str]]) -> None:
        """A metric with labels: (name suffix, labels, value) per sample."""
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        self.lines += [f"{name}{suffix}{_labels(labels)} {value}"
                       for suffix, labels, value in samples]

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


async def _postgres(ctx: AppContext, out: Exposition) -> bool:
    try:
        async with ctx.pool.acquire() as conn, conn.transaction(readonly=True):
            counts = [await conn.fetchval(sql) for _, _, sql in _QUEUES]
            unsummed = await conn.fetchval(
                "SELECT count(*) FROM usage_events WHERE xid >= $1", await rollup_horizon(conn))
    except STORE_ERRORS:
        return False
    for (name, help_text, _), count in zip(_QUEUES, counts, strict=True):
        out.add(name, help_text, count)
    out.add("creditgate_usage_events_unsummed",
            "usage events the rollup pass has not summed yet (its lag)", unsummed)
    return True


async def _redis(ctx: AppContext) -> bool:
    try:
        await ctx.redis.ping()
    except STORE_ERRORS:
        return False
    return True


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except OSError:
        return 0


def _observed(observed: Observed, out: Exposition) -> None:
    requests: list[tuple[str, dict[str, str], int | str]] = []
    durations: list[tuple[str, dict[str, str], int | str]] = []
    for (method, route), stats in sorted(observed.routes.items(), key=lambda kv: kv[0][::-1]):
        labels = {"method": method, "route": route}
        requests += [("", {**labels, "code": str(code)}, n) for code, n in sorted(stats.codes.items())]
        counts = stats.cumulative()
        if not counts[-1]:
            continue
        durations += [("_bucket", {**labels, "le": le}, n)
                      for le, n in zip((*BUCKETS, "+Inf"), counts, strict=True)]
        durations += [("_sum", labels, _seconds(stats.sum_ns)), ("_count", labels, counts[-1])]
    out.family("creditgate_http_requests_total", "requests answered, by route and status code",
               "counter", requests)
    out.family("creditgate_http_request_duration_seconds",
               "time from a request's arrival to its answer sent (a stream's: to its start)",
               "histogram", durations)
    out.family("creditgate_checks_total", "checks answered, by reason and whether consuming",
               "counter", [("", {"reason": reason, "consume": str(consume).lower()}, n)
                           for (reason, consume), n in sorted(observed.checks.items())])
    out.family("creditgate_usage_events_total", "usage events answered, by status", "counter",
               [("", {"status": status}, n) for status, n in sorted(observed.usage.items())])
    out.family("creditgate_measurements_total", "measurements answered, by status", "counter",
               [("", {"status": status}, n)
                for status, n in sorted(observed.measurements.items())])


async def metrics(call: Call) -> Response:
    ctx, out = call.ctx, Exposition()
    out.add("creditgate_postgres_up", "1 when Postgres answered this scrape",
            int(await _postgres(ctx, out)))
    out.add("creditgate_redis_up", "1 when Redis answered this scrape", int(await _redis(ctx)))
    cache = ctx.hot.cache
    if cache is not None:
        out.add("creditgate_check_cache_hits_total", "plain checks answered from memory",
                cache.hits, "counter")
        out.add("creditgate_check_cache_entries", "check answers held in memory", len(cache))
        out.add("creditgate_check_cache_armed",
                "1 while Redis's invalidations are heard (else checks go to Redis)",
                int(cache.armed))
    out.add("creditgate_balance_streams_open", "balance streams open on this process",
            streams.OPEN.count)
    out.add("creditgate_journal_sweep_failures_total",
            "sweeps of a root's journal that Postgres refused (`creditgate journal stuck`)",
            ctx.journal.sweep_failures, "counter")
    out.add("creditgate_hotstate_roots_verified_total",
            "loaded roots this process's workers compared with Postgres (a sample)",
            ctx.hot_check.verified, "counter")
    out.add("creditgate_hotstate_roots_repaired_total",
            "roots whose hot copy differed from Postgres twice, dropped for a rebuild",
            ctx.hot_check.repaired, "counter")
    dispatcher = ctx.dispatcher
    if dispatcher is not None:
        out.add("creditgate_webhook_claim_queries_total",
                "queries for due deliveries (each poll, notification and full batch)",
                dispatcher.claims_made, "counter")
        out.add("creditgate_webhook_notifications_total",
                "new-delivery notifications heard from Postgres", dispatcher.notifications,
                "counter")
    if ctx.observed is not None:
        _observed(ctx.observed, out)
    out.add("creditgate_process_cpu_seconds_total", "CPU time of this process",
            f"{time.process_time():.3f}", "counter")
    out.add("creditgate_process_resident_memory_bytes", "resident memory of this process",
            _resident_bytes())
    return Response(out.text(), media_type=MEDIA_TYPE)
