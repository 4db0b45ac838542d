"""The outbox dispatcher: claims due deliveries, sends them signed, records every attempt.

Any number of dispatchers run at once (one per app process). A claim is a single statement
that locks due rows with SKIP LOCKED, counts the attempt and pushes `next_attempt_at` past a
lease, so two dispatchers never send the same attempt; the HTTP call happens outside any
transaction; outcomes are written in batches, each in one statement. A dispatcher that dies
mid-send leaves its claims to expire: another one sends them again (at least once; receivers
dedupe by `webhook-id`).

A receiver cannot hold the dispatcher up: every attempt has a 15 s deadline for the whole
exchange, reads at most 1 KB of the answer (for the log, and for at most 1 s once the status
is in), follows no redirect, and one endpoint never has more than `per_endpoint` attempts in
flight, so slow receivers cannot take every slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import logging
import random
import time
from collections import Counter, deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Literal, TypeVar, cast

import asyncpg
import httpx

from app.db import Conn, Connection
from app.errors import STORE_ERRORS
from app.webhooks import repository as repo
from app.webhooks import service
from app.webhooks.net import transport
from app.webhooks.outbox import CHANNEL
from app.webhooks.signing import signed_headers

if TYPE_CHECKING:
    from app.settings import Seconds, Settings

log = logging.getLogger(__name__)

Kind = Literal["delivered", "failed", "gone", "cancelled", "interrupted", "released"]
RETRY_ERRORS: tuple[type[BaseException], ...] = (
    *STORE_ERRORS, asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
JITTER = 0.1  # each retry waits its scheduled delay +-10%
T = TypeVar("T")
# the idle poll while no notification connection is up (the configured one applies with it)
UNHEARD_POLL_S = 0.1


@dataclass(frozen=True)
class DispatchConfig:
    concurrency: int = 50
    per_endpoint: int = 10
    poll_s: Seconds = 1.0  # idle: queued deliveries are notified, this finds due retries
    timeout_s: Seconds = 15.0
    lease: timedelta = timedelta(seconds=60)  # > timeout_s: a claim outlives its attempt
    schedule_s: tuple[Seconds, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000)
    retry_after_cap_s: Seconds = 36000
    allow_private: bool = False
    excerpt_bytes: int = 1024
    excerpt_wait_s: Seconds = 1.0
    disable_after: timedelta = timedelta(days=5)
    max_claim: int = 100
    record_wait_s: Seconds = 0.01

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
    claimed_at: Seconds = 0.0  # time.monotonic()

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
    retry_after_s: Seconds | None = None


def parse_retry_after(value: str | None, now: datetime) -> Seconds | None:
    """Seconds to wait from a Retry-After header (delay-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)  # float-ok: seconds
    try:
        at = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return max(0.0, (at - now).total_seconds())


def retry_in(outcome: Outcome, config: DispatchConfig, rng: random.Random) -> Seconds | None:
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
    if outcome.kind in ("interrupted", "released"):
        return "pending", 0.0
    wait = retry_in(outcome, config, rng)
    return ("failed", None) if wait is None else ("pending", wait)


def _clean(text: str, limit: int) -> str:
    return text.replace("\x00", "\ufffd")[:limit]  # Postgres text holds no NUL


def describe(exc: BaseException) -> str:
    detail = str(exc) or exc.__class__.__doc__ or ""
    return _clean(f"{type(exc).__name__}: {detail.strip().splitlines()[0] if detail else ''}", 500)


async def read_excerpt(response: httpx.Response, limit: int, wait_s: Seconds) -> str:
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


@functools.lru_cache(maxsize=4096)
def parsed_url(url: str) -> httpx.URL:
    return httpx.URL(url)


async def post(transport: httpx.AsyncBaseTransport, request: httpx.Request,
               config: DispatchConfig, deadline: Seconds) -> tuple[int, str | None, str]:
    """(status, Retry-After, the start of the body) of one POST; redirects are not followed."""
    response = await transport.handle_async_request(request)
    try:
        # the body is only for the log: never let it cost the status already in hand
        wait_s = min(config.excerpt_wait_s, deadline - time.monotonic() - 0.05)
        excerpt = await read_excerpt(response, config.excerpt_bytes, wait_s) if wait_s > 0 else ""
        return response.status_code, response.headers.get("retry-after"), excerpt
    finally:
        await response.aclose()


async def attempt(transport: httpx.AsyncBaseTransport, job: Job, config: DispatchConfig) -> Outcome:
    """POST the event once, signed; never raises for anything the receiver does.

    Straight through the transport: no client logic (redirects, cookies, a log line per
    request) is wanted here."""
    body = job.payload.encode()
    attempted_at = datetime.now(UTC)
    headers = signed_headers(job.event_id, int(time.time()), body, job.secrets)
    started = time.monotonic()
    code: int | None = None
    excerpt = error = None
    retry_after = None
    try:
        # no per-operation timeouts: the deadline below covers connect, send and answer
        request = httpx.Request("POST", parsed_url(job.url), content=body, headers=headers)
        async with asyncio.timeout(config.timeout_s):
            code, retry_header, excerpt = await post(transport, request, config,
                                                     started + config.timeout_s)
        retry_after = parse_retry_after(retry_header, attempted_at)
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


async def record_attempts(conn: Conn, outcomes: list[Outcome],
                          settled: list[tuple[object, ...]], config: DispatchConfig) -> bool:
    """Log the attempts and settle their deliveries (one statement); whether the endpoints'
    streaks need record_streaks."""
    attempts = [(o.job.delivery_id, o.job.claim, o.attempted_at, o.status_code, o.latency_ms,
                 o.error, o.excerpt) for o in outcomes if o.kind not in ("cancelled", "released")]
    released = [(o.job.delivery_id, o.job.claim) for o in outcomes if o.kind == "released"]
    sent = [row for row, o in zip(settled, outcomes, strict=True) if o.kind != "released"]
    changing = await repo.record_outcomes(conn, attempts, sent, released, streaks(outcomes),
                                          config.disable_after)
    return changing or any(o.kind == "gone" for o in outcomes)


async def record_streaks(conn: Connection, outcomes: list[Outcome], config: DispatchConfig) -> None:
    """Update the endpoints' failing streaks and disable the endpoints that are gone or have
    failed for too long. A transaction of its own: like every writer here it locks endpoint
    rows before delivery rows (and those in id order), so writers never deadlock."""
    gone = sorted({o.job.endpoint_id for o in outcomes if o.kind == "gone"})
    async with conn.transaction():
        failing = await repo.update_streaks(conn, streaks(outcomes), config.disable_after)
        for endpoint_id in gone:
            await service.disable_endpoint(conn, endpoint_id, "gone",
                                           "the receiver answered 410 Gone")
        for endpoint_id in failing:
            if endpoint_id not in gone:
                await service.disable_endpoint(
                    conn, endpoint_id, "failing",
                    f"every attempt failed for {config.disable_after.days} days")


def _set(event: asyncio.Event, *_: object) -> None:
    event.set()


@dataclass
class Dispatcher:
    """Claims ahead: each endpoint holds up to 2 x `per_endpoint` claimed deliveries, at most
    `per_endpoint` of them in flight, the rest queued here and sent the moment a slot frees,
    with no database round trip in between. The queue is bounded, so a queued claim is sent
    well within its lease (or released if it waited half of it)."""

    pool: asyncpg.Pool
    config: DispatchConfig = field(default_factory=DispatchConfig)
    # a connection of its own LISTENs for new deliveries (outbox.CHANNEL) when this is set;
    # without it, or while it is down, the dispatcher polls every UNHEARD_POLL_S at most
    listen_dsn: str | None = None
    channel: str = CHANNEL
    rng: random.Random = field(default_factory=random.Random)
    attempts_made: int = 0
    claims_made: int = 0
    notifications: int = 0  # heard on the channel
    _transport: httpx.AsyncBaseTransport | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _inflight: dict[asyncio.Task[None], Job] = field(default_factory=dict)
    _sending: Counter[int] = field(default_factory=Counter)  # in flight, per endpoint
    _held: Counter[int] = field(default_factory=Counter)  # in flight or queued, per endpoint
    _queued: dict[int, deque[Job]] = field(default_factory=dict)
    _outcomes: asyncio.Queue[Outcome] = field(default_factory=asyncio.Queue)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _listening: bool = False

    def start(self) -> None:
        self._transport = transport(self.config.per_endpoint, guarded=not self.config.allow_private)
        self._tasks = [asyncio.create_task(self._claim_loop(), name="webhooks-claim"),
                       asyncio.create_task(self._record_loop(), name="webhooks-record")]
        if self.listen_dsn:
            self._tasks.append(asyncio.create_task(self._listen_loop(self.listen_dsn),
                                                   name="webhooks-listen"))

    async def stop(self, drain_s: Seconds = 2.0) -> None:
        """Release what is queued, let attempts in flight finish (for up to drain_s), record
        everything, close."""
        claim_loop, record_loop, *listen = self._tasks or (None, None)
        for task in listen:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if claim_loop:
            claim_loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await claim_loop
        for queue in self._queued.values():
            for job in queue:
                self._outcomes.put_nowait(Outcome(job, "released", datetime.now(UTC)))
        self._queued.clear()
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
        if self._transport:
            await self._transport.aclose()

    # --- claiming and sending --------------------------------------------------------------

    @property
    def _hold_cap(self) -> int:
        return 2 * self.config.per_endpoint

    def _room(self) -> tuple[list[int], list[int], list[int]]:
        """(endpoints with no room left, endpoints with some, how much each has)."""
        full, some, room = [], [], []
        for endpoint_id, n in self._held.items():
            left = self._hold_cap - n
            if left > 0:
                some.append(endpoint_id)
                room.append(left)
            else:
                full.append(endpoint_id)
        return full, some, room

    async def _claim(self, limit: int) -> list[Job]:
        self.claims_made += 1
        full, some, room = self._room()
        rows = await repo.claim(self.pool, limit, full, some, room, self._hold_cap,
                                self.config.lease)
        now = time.monotonic()
        return [Job(r["id"], r["attempts"], r["retry_base"], r["endpoint_id"], r["event_id"],
                    r["payload"], r["url"], r["enabled"], list(r["secrets"]), now) for r in rows]

    async def _claim_loop(self) -> None:
        while True:
            self._wake.clear()  # before the claim: a landing during it still wakes us
            held = sum(self._held.values())
            limit = min(2 * self.config.concurrency - held, self.config.max_claim)
            jobs: list[Job] = []
            if limit > 0:
                try:
                    jobs = await self._claim(limit)
                except RETRY_ERRORS as exc:
                    log.warning("webhook claim failed, retrying: %s", exc)
                    await asyncio.sleep(1.0)
                    continue
                except Exception:
                    log.exception("webhook claim failed")
                    await asyncio.sleep(1.0)
                    continue
            for job in jobs:
                self._queued.setdefault(job.endpoint_id, deque()).append(job)
                self._held[job.endpoint_id] += 1
            self._pump()
            if limit > 0 and len(jobs) == limit:
                continue  # a full claim: more may be due
            if any(self._held.get(e, 0) <= self.config.per_endpoint
                   for e in {job.endpoint_id for job in jobs}):
                continue  # landings during the claim left an endpoint with due work half empty
            # idle, or everything held: poll again, sooner once room frees up or a
            # notification says deliveries were queued
            poll_s = self.config.poll_s if self._listening else min(self.config.poll_s,
                                                                    UNHEARD_POLL_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), poll_s)

    def _heard(self, *_: object) -> None:
        self.notifications += 1
        self._wake.set()

    async def _listen_loop(self, dsn: str) -> None:
        """Hold a connection that LISTENs for queued deliveries; each notification wakes the
        claim loop. A lost connection is opened again (the claim loop polls meanwhile)."""
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(dsn)
                lost = asyncio.Event()
                conn.add_termination_listener(functools.partial(_set, lost))
                await conn.add_listener(self.channel, self._heard)
                self._listening = True
                self._wake.set()  # what was queued while nobody listened
                await lost.wait()
                log.warning("webhook notifications lost; polling until they are back")
            except Exception as exc:  # any failure: poll meanwhile, try again in a second
                log.warning("cannot listen for webhook notifications: %s", exc)
            finally:
                self._listening = False
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(conn.close(timeout=1))
            await asyncio.sleep(1.0)

    def _pump(self, first: int | None = None) -> None:
        """Send queued deliveries while their endpoint and the dispatcher have room; the
        endpoint that just freed a slot goes first."""
        order = list(self._queued)
        if first in self._queued:
            order.remove(first)
            order.insert(0, first)
        stale = time.monotonic() - self.config.lease.total_seconds() / 2
        for endpoint_id in order:
            queue = self._queued[endpoint_id]
            while queue and self._sending[endpoint_id] < self.config.per_endpoint \
                    and len(self._inflight) < self.config.concurrency:
                job = queue.popleft()
                if job.claimed_at < stale:  # waited too long: let any dispatcher take it
                    self._drop(job)
                    self._outcomes.put_nowait(Outcome(job, "released", datetime.now(UTC)))
                else:
                    self._launch(job)
            if not queue:
                del self._queued[endpoint_id]
            if len(self._inflight) >= self.config.concurrency:
                return

    def _launch(self, job: Job) -> None:
        task = asyncio.create_task(self._deliver(job))
        self._inflight[task] = job
        self._sending[job.endpoint_id] += 1
        task.add_done_callback(self._landed)

    def _drop(self, job: Job) -> None:
        self._held[job.endpoint_id] -= 1
        if self._held[job.endpoint_id] <= 0:
            del self._held[job.endpoint_id]

    def _landed(self, task: asyncio.Task[None]) -> None:
        job = self._inflight.pop(task)
        endpoint_id = job.endpoint_id
        self._sending[endpoint_id] -= 1
        if self._sending[endpoint_id] <= 0:
            del self._sending[endpoint_id]
        self._drop(job)
        self._pump(first=endpoint_id)
        # claim again when it pays: half an endpoint's hold, or half of all, is free
        if self._held.get(endpoint_id, 0) == self.config.per_endpoint or \
                sum(self._held.values()) == self.config.concurrency:
            self._wake.set()

    async def _deliver(self, job: Job) -> None:
        if not job.enabled:  # disabled after the delivery was queued
            self._outcomes.put_nowait(Outcome(job, "cancelled", datetime.now(UTC)))
            return
        assert self._transport is not None
        self.attempts_made += 1
        try:
            outcome = await attempt(self._transport, job, self.config)
        except asyncio.CancelledError:
            self._outcomes.put_nowait(Outcome(job, "interrupted", datetime.now(UTC),
                                              error="interrupted: the dispatcher stopped"))
            raise
        self._outcomes.put_nowait(outcome)

    # --- recording -------------------------------------------------------------------------

    async def _record_loop(self) -> None:
        while True:
            batch = [await self._outcomes.get()]
            # a moment for more outcomes to join: one transaction for many attempts
            await asyncio.sleep(self.config.record_wait_s)
            while len(batch) < 1_000 and not self._outcomes.empty():
                batch.append(self._outcomes.get_nowait())
            try:
                await self._record(batch)
            finally:
                for _ in batch:
                    self._outcomes.task_done()

    async def _record(self, batch: list[Outcome]) -> None:
        settled = settled_rows(batch, self.config, self.rng)
        streaks_changing = await self._retrying(
            len(batch), lambda conn: record_attempts(conn, batch, settled, self.config))
        if streaks_changing:  # rare: healthy endpoints need no transaction, no lock
            await self._retrying(len(batch), lambda conn: record_streaks(conn, batch, self.config))

    async def _retrying(self, n: int, write: Callable[[Connection], Awaitable[T]]) -> T | None:
        # An outcome never recorded is not lost for good: its claim expires, it is sent again.
        deadline = time.monotonic() + self.config.lease.total_seconds() / 2
        while True:
            try:
                async with self.pool.acquire() as conn:
                    return await write(conn)
            except RETRY_ERRORS as exc:
                if time.monotonic() > deadline:
                    log.error("dropped %d webhook outcomes: %s", n, exc)
                    return None
                log.warning("recording webhook outcomes failed, retrying: %s", exc)
                await asyncio.sleep(0.5)
            except Exception:
                log.exception("dropped %d webhook outcomes", n)
                return None
