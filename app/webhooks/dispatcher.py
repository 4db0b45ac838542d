"""The outbox dispatcher: claims due deliveries, sends them signed, records every attempt.

Any number of dispatchers run at once (one per app process). A claim is a single statement
that locks due rows with SKIP LOCKED, counts the attempt and pushes `next_attempt_at` past a
lease, so two dispatchers never send the same attempt; the HTTP call happens outside any
transaction; outcomes are written in batches. A dispatcher that dies mid-send leaves its
claims to expire: another one sends them again (at least once; receivers dedupe by
`webhook-id`).

A receiver cannot hold the dispatcher up: every attempt has a 15 s deadline for the whole
exchange, reads at most 1 KB of the answer (for the log, and for at most 1 s once the status
is in), follows no redirect, and one endpoint never has more than `per_endpoint` attempts in
flight, so slow receivers cannot take every slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Literal, cast

import asyncpg
import httpx

from app.db import Connection
from app.errors import STORE_ERRORS
from app.webhooks import repository as repo
from app.webhooks import service
from app.webhooks.signing import signed_headers
from app.webhooks.urls import transport

if TYPE_CHECKING:
    from app.settings import Settings

log = logging.getLogger(__name__)

Kind = Literal["delivered", "failed", "gone", "cancelled", "interrupted"]
RETRY_ERRORS: tuple[type[BaseException], ...] = (
    *STORE_ERRORS, asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
JITTER = 0.1  # each retry waits its scheduled delay +-10%


@dataclass(frozen=True)
class DispatchConfig:
    concurrency: int = 50
    per_endpoint: int = 10
    poll_s: float = 0.1
    timeout_s: float = 15.0
    lease: timedelta = timedelta(seconds=60)  # > timeout_s: a claim outlives its attempt
    schedule_s: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000)
    retry_after_cap_s: float = 36000
    allow_private: bool = False
    excerpt_bytes: int = 1024
    excerpt_wait_s: float = 1.0
    disable_after: timedelta = timedelta(days=5)
    max_claim: int = 100

    @classmethod
    def from_settings(cls, settings: Settings) -> DispatchConfig:
        return cls(concurrency=settings.webhooks_concurrency,
                   per_endpoint=max(2, settings.webhooks_concurrency // 5),
                   poll_s=settings.webhooks_poll_s, schedule_s=settings.webhooks_retry_schedule_s,
                   allow_private=settings.webhooks_allow_private)


@dataclass(frozen=True)
class Job:
    """One claimed attempt of one delivery."""

    delivery_id: int
    claim: int  # the delivery's `attempts` after this claim
    retry_base: int
    endpoint_id: int
    event_id: str
    payload: str
    url: str
    enabled: bool
    secrets: list[str]

    @property
    def nth(self) -> int:
        """1 for the first attempt since the delivery was created or replayed."""
        return self.claim - self.retry_base


@dataclass(frozen=True)
class Outcome:
    job: Job
    kind: Kind
    attempted_at: datetime
    latency_ms: int = 0
    status_code: int | None = None
    error: str | None = None
    excerpt: str | None = None
    retry_after_s: float | None = None


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        at = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return max(0.0, (at - now).total_seconds())


def retry_in(outcome: Outcome, config: DispatchConfig, rng: random.Random) -> float | None:
    """Seconds until the next attempt after a failed one; None: give up."""
    if outcome.job.nth > len(config.schedule_s):
        return None
    if outcome.retry_after_s is not None:
        return min(max(outcome.retry_after_s, 1.0), config.retry_after_cap_s)
    delay = config.schedule_s[outcome.job.nth - 1]
    return delay * rng.uniform(1 - JITTER, 1 + JITTER)


def settlement(outcome: Outcome, config: DispatchConfig,
               rng: random.Random) -> tuple[str, float | None]:
    """(the delivery's new status, seconds until its next attempt)."""
    if outcome.kind in ("delivered", "cancelled"):
        return outcome.kind, None
    if outcome.kind == "gone":
        return "failed", None
    if outcome.kind == "interrupted":
        return "pending", 0.0
    wait = retry_in(outcome, config, rng)
    return ("failed", None) if wait is None else ("pending", wait)


def _clean(text: str, limit: int) -> str:
    return text.replace("\x00", "\ufffd")[:limit]  # Postgres text holds no NUL


def describe(exc: BaseException) -> str:
    detail = str(exc) or exc.__class__.__doc__ or ""
    return _clean(f"{type(exc).__name__}: {detail.strip().splitlines()[0] if detail else ''}", 500)


async def read_excerpt(response: httpx.Response, limit: int, wait_s: float) -> str:
    """At most `limit` bytes of the body, for at most `wait_s`; the rest is never read."""
    got = bytearray()
    with contextlib.suppress(TimeoutError, httpx.HTTPError):
        async with asyncio.timeout(wait_s):
            chunks = cast(AsyncGenerator[bytes, None], response.aiter_raw())
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    got += chunk[: limit - len(got)]
                    if len(got) >= limit:
                        break
    return _clean(got.decode("utf-8", "replace"), limit)


async def attempt(client: httpx.AsyncClient, job: Job, config: DispatchConfig) -> Outcome:
    """POST the event once, signed; never raises for anything the receiver does."""
    body = job.payload.encode()
    attempted_at = datetime.now(UTC)
    headers = signed_headers(job.event_id, int(time.time()), body, job.secrets)
    started = time.monotonic()
    code: int | None = None
    excerpt = error = None
    retry_after = None
    try:
        async with asyncio.timeout(config.timeout_s):
            async with client.stream("POST", job.url, content=body, headers=headers) as response:
                code = response.status_code
                retry_after = parse_retry_after(response.headers.get("retry-after"), attempted_at)
                excerpt = await read_excerpt(response, config.excerpt_bytes, config.excerpt_wait_s)
    except TimeoutError:
        error = f"no complete answer within {config.timeout_s:g} s"
    except httpx.HTTPError as exc:
        error = describe(exc)
    except Exception as exc:  # whatever a receiver sends must not stop the dispatcher
        log.warning("webhook attempt to %s failed oddly", job.url, exc_info=True)
        error = describe(exc)
    latency_ms = int((time.monotonic() - started) * 1000)
    kind: Kind = "failed"
    if code is not None and 200 <= code < 300:
        kind = "delivered"
    elif code == 410:
        kind = "gone"
    if code is not None and 300 <= code < 400 and error is None:
        error = "redirects are not followed"
    return Outcome(job, kind, attempted_at, latency_ms, code, error, excerpt, retry_after)


def streaks(outcomes: list[Outcome]) -> list[tuple[int, bool, datetime | None]]:
    """Per endpoint, in the order the outcomes came: (succeeded at least once, first failure
    after the last success)."""
    state: dict[int, tuple[bool, datetime | None]] = {}
    for o in outcomes:
        reset, fail_at = state.get(o.job.endpoint_id, (False, None))
        if o.kind == "delivered":
            state[o.job.endpoint_id] = (True, None)
        elif o.kind in ("failed", "gone"):
            state[o.job.endpoint_id] = (reset, fail_at or o.attempted_at)
    return [(endpoint_id, reset, fail_at) for endpoint_id, (reset, fail_at) in state.items()]


def settled_rows(outcomes: list[Outcome], config: DispatchConfig,
                 rng: random.Random) -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = []
    for o in outcomes:
        status, wait = settlement(o, config, rng)
        error = o.error if o.kind != "cancelled" else "endpoint disabled"
        if o.kind == "failed" and error is None:
            error = f"answered {o.status_code}"
        rows.append((o.job.delivery_id, o.job.claim, status, wait, o.status_code, error,
                     o.attempted_at if o.kind == "delivered" else None))
    return rows


async def record_attempts(conn: Connection, outcomes: list[Outcome],
                          settled: list[tuple[object, ...]]) -> None:
    """Log the attempts and settle their deliveries, in one transaction."""
    attempts = [(o.job.delivery_id, o.job.claim, o.attempted_at, o.status_code, o.latency_ms,
                 o.error, o.excerpt) for o in outcomes if o.kind != "cancelled"]
    async with conn.transaction():
        await repo.insert_attempts(conn, attempts)
        await repo.settle_deliveries(conn, settled)


async def record_streaks(conn: Connection, outcomes: list[Outcome], config: DispatchConfig) -> None:
    """Update the endpoints' failing streaks and disable the endpoints that are gone or have
    failed for too long. A transaction of its own: like every writer here it locks endpoint
    rows before delivery rows (and those in id order), so writers never deadlock."""
    async with conn.transaction():
        failing = await repo.update_streaks(conn, streaks(outcomes), config.disable_after)
        gone = sorted({o.job.endpoint_id for o in outcomes if o.kind == "gone"})
        for endpoint_id in gone:
            await service.disable_endpoint(conn, endpoint_id, "gone",
                                           "the receiver answered 410 Gone")
        for endpoint_id in failing:
            if endpoint_id not in gone:
                await service.disable_endpoint(
                    conn, endpoint_id, "failing",
                    f"every attempt failed for {config.disable_after.days} days")


@dataclass
class Dispatcher:
    pool: asyncpg.Pool
    config: DispatchConfig = field(default_factory=DispatchConfig)
    rng: random.Random = field(default_factory=random.Random)
    _client: httpx.AsyncClient | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _inflight: dict[asyncio.Task[None], Job] = field(default_factory=dict)
    _per_endpoint: Counter[int] = field(default_factory=Counter)
    _outcomes: asyncio.Queue[Outcome] = field(default_factory=asyncio.Queue)
    _freed: asyncio.Event = field(default_factory=asyncio.Event)
    attempts_made: int = 0

    def start(self) -> None:
        limits = httpx.Limits(max_connections=self.config.concurrency,
                              max_keepalive_connections=self.config.concurrency)
        self._client = httpx.AsyncClient(
            transport=transport(limits, guarded=not self.config.allow_private),
            timeout=self.config.timeout_s, follow_redirects=False, trust_env=False)
        self._tasks = [asyncio.create_task(self._claim_loop(), name="webhooks-claim"),
                       asyncio.create_task(self._record_loop(), name="webhooks-record")]

    async def stop(self, drain_s: float = 2.0) -> None:
        """Let attempts in flight finish (for up to drain_s), record them, close."""
        claim_loop, record_loop = self._tasks or (None, None)
        if claim_loop:
            claim_loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await claim_loop
        if self._inflight:
            _, late = await asyncio.wait(list(self._inflight), timeout=drain_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if record_loop:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._outcomes.join(), timeout=drain_s + 3)
            record_loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await record_loop
        if self._client:
            await self._client.aclose()

    # --- claiming and sending --------------------------------------------------------------

    def _busy(self, step: int) -> list[int]:
        return [e for e, n in self._per_endpoint.items() if n > self.config.per_endpoint - step]

    async def _claim(self, free: int) -> list[Job]:
        step = max(1, self.config.per_endpoint // 2)
        rows = await repo.claim(self.pool, min(free, self.config.max_claim), self._busy(step),
                                step, self.config.lease)
        return [Job(r["id"], r["attempts"], r["retry_base"], r["endpoint_id"], r["event_id"],
                    r["payload"], r["url"], r["enabled"], list(r["secrets"])) for r in rows]

    async def _claim_loop(self) -> None:
        low_water = max(1, self.config.concurrency // 5)
        while True:
            free = self.config.concurrency - len(self._inflight)
            if free < low_water and self._inflight:
                # wait for a few slots rather than claim one row at a time
                self._freed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._freed.wait(), self.config.poll_s)
                if self.config.concurrency - len(self._inflight) < 1:
                    continue
                free = self.config.concurrency - len(self._inflight)
            try:
                jobs = await self._claim(free)
            except RETRY_ERRORS as exc:
                log.warning("webhook claim failed, retrying: %s", exc)
                await asyncio.sleep(1.0)
                continue
            except Exception:
                log.exception("webhook claim failed")
                await asyncio.sleep(1.0)
                continue
            for job in jobs:
                self._launch(job)
            if len(jobs) < min(free, self.config.max_claim):
                await asyncio.sleep(self.config.poll_s)

    def _launch(self, job: Job) -> None:
        task = asyncio.create_task(self._deliver(job))
        self._inflight[task] = job
        self._per_endpoint[job.endpoint_id] += 1
        task.add_done_callback(self._landed)

    def _landed(self, task: asyncio.Task[None]) -> None:
        job = self._inflight.pop(task)
        self._per_endpoint[job.endpoint_id] -= 1
        if self._per_endpoint[job.endpoint_id] <= 0:
            del self._per_endpoint[job.endpoint_id]
        self._freed.set()

    async def _deliver(self, job: Job) -> None:
        if not job.enabled:  # disabled after the delivery was queued
            self._outcomes.put_nowait(Outcome(job, "cancelled", datetime.now(UTC)))
            return
        assert self._client is not None
        self.attempts_made += 1
        try:
            outcome = await attempt(self._client, job, self.config)
        except asyncio.CancelledError:
            self._outcomes.put_nowait(Outcome(job, "interrupted", datetime.now(UTC),
                                              error="interrupted: the dispatcher stopped"))
            raise
        self._outcomes.put_nowait(outcome)

    # --- recording -------------------------------------------------------------------------

    async def _record_loop(self) -> None:
        while True:
            batch = [await self._outcomes.get()]
            while len(batch) < 1_000 and not self._outcomes.empty():
                batch.append(self._outcomes.get_nowait())
            try:
                await self._record(batch)
            finally:
                for _ in batch:
                    self._outcomes.task_done()

    async def _record(self, batch: list[Outcome]) -> None:
        settled = settled_rows(batch, self.config, self.rng)
        if await self._retrying(len(batch), lambda conn: record_attempts(conn, batch, settled)):
            await self._retrying(len(batch), lambda conn: record_streaks(conn, batch, self.config))

    async def _retrying(self, n: int, write: Callable[[Connection], Awaitable[None]]) -> bool:
        # An outcome never recorded is not lost for good: its claim expires, it is sent again.
        deadline = time.monotonic() + self.config.lease.total_seconds() / 2
        while True:
            try:
                async with self.pool.acquire() as conn:
                    await write(conn)
                return True
            except RETRY_ERRORS as exc:
                if time.monotonic() > deadline:
                    log.error("dropped %d webhook outcomes: %s", n, exc)
                    return False
                log.warning("recording webhook outcomes failed, retrying: %s", exc)
                await asyncio.sleep(0.5)
            except Exception:
                log.exception("dropped %d webhook outcomes", n)
                return False
