"""Webhook dispatch benchmark: deliveries per second to a local receiver, and event-to-delivery
latency at a steady rate.

    .venv/bin/python bench/webhooks.py [--rate 1000] [--duration 10] [--dispatchers 1]

Everything runs as real processes on this machine: a receiver (a lean asyncio HTTP/1.1 server
answering 200, checking one signature in 100 with `standardwebhooks`), N dispatcher processes
(`app.webhooks.dispatcher.Dispatcher` on uvloop, as in the app), and this process as the
producer, which commits events through `app.webhooks.outbox.publish` (a batch every 10 ms, as
the journal flusher does). A database `creditgate_bench_wh_<random>` is created beside
`--admin-database-url` (or `BENCH_DATABASE_URL`) and dropped at the end.

Phases:
1. **throughput**: a backlog of `--backlog` events is committed with no dispatcher running,
   then the dispatchers start; deliveries/s = backlog / time until the receiver has them all.
2. **latency**: events are committed at `--rate` per second for `--duration` seconds; the
   latency of an event is the receiver's clock when it arrives minus the producer's clock
   when its transaction committed (same machine, same clock). p50/p99 over all events.
3. **idle**: the dispatchers run for `--idle` seconds with nothing to send: CPU per second.

Phases 2 and 3 run in two modes, in the same run: `notify` (the app's way: dispatchers LISTEN
and poll every `--poll` s; the producer nudges them after each commit, as the journal does)
and `poll` (the baseline, as before notifications: no LISTEN, poll every `--baseline-poll`
s). Phase 1 runs in `notify` mode.

Target (issue 4): >= 1,000 deliveries/s with p99 < 1 s at that rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.db import create_pool, migrate  # noqa: E402
from app.webhooks.outbox import Nudger, OutboxEvent, event_id, publish  # noqa: E402

TARGET_PER_S = 1_000
TARGET_P99_S = 1.0
EVENT_TYPE = "payment.succeeded"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the receiver process ------------------------------------------------------------------


@dataclass
class ReceiverState:
    secret: str
    arrivals: dict[str, float] = field(default_factory=dict)
    duplicates: int = 0
    verified: int = 0
    bad: int = 0


async def serve_receiver(port: int, secret: str, out: Path) -> None:
    from standardwebhooks.webhooks import Webhook, WebhookVerificationError

    state = ReceiverState(secret)
    verifier = Webhook(secret)
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                now = time.time()
                headers = {}
                request_line, *lines = head.decode("latin-1").split("\r\n")
                for line in lines:
                    name, _, value = line.partition(":")
                    if name:
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                # a delivery: an event (webhook-id) to an endpoint (path)
                delivery = request_line.split(" ")[1] + " " + headers.get("webhook-id", "")
                if delivery in state.arrivals:
                    state.duplicates += 1
                else:
                    state.arrivals[delivery] = now
                if len(state.arrivals) % 100 == 1:
                    try:
                        verifier.verify(body, headers)
                        state.verified += 1
                    except WebhookVerificationError:
                        state.bad += 1
                writer.write(answer)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()
    found = {"arrivals": state.arrivals, "duplicates": state.duplicates,
             "verified": state.verified, "bad": state.bad}
    out.write_text(json.dumps(found))  # noqa: ASYNC240


# --- a dispatcher process ------------------------------------------------------------------


async def run_dispatcher(dsn: str, concurrency: int, poll_s: float, listen: bool) -> None:
    from app.webhooks.dispatcher import DispatchConfig, Dispatcher

    pool = await create_pool(dsn, 4)
    dispatcher = Dispatcher(pool, DispatchConfig(concurrency=concurrency, poll_s=poll_s,
                                                 per_endpoint=max(2, concurrency // 5)),
                            listen_dsn=dsn if listen else None)
    dispatcher.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await dispatcher.stop()
    await pool.close()


# --- the producer and the measurement ------------------------------------------------------


def spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, *args], cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def wait_port(port: int) -> None:
    for _ in range(100):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def events(run: str, start: int, n: int) -> list[OutboxEvent]:
    now = datetime.now(UTC)
    return [OutboxEvent(event_id("bench", run, i), EVENT_TYPE, None, None, now,
                        {"n": i, "amount": "12.50", "currency": "usd"})
            for i in range(start, start + n)]


async def publish_batch(pool: asyncpg.Pool, batch: list[OutboxEvent], mode: str) -> float:
    """Commit a batch (as the journal does: no NOTIFY inside, a nudge after); the commit time."""
    async with pool.acquire() as conn, conn.transaction():
        queued = await publish(conn, batch, notify_at_commit=False)
    at = time.time()
    if queued and mode == "notify":
        await Nudger(pool).notify()
    return at


async def pending_count(conn: asyncpg.Connection) -> int:
    # the partial index of due deliveries answers this without scanning the log
    return int(await conn.fetchval("SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'"))


def cpu_seconds(pids: dict[str, list[int]]) -> dict[str, dict[int, float]]:
    """CPU seconds used so far, per process, by each group ("postgres": every postgres process
    on the machine, so other users of a shared server are counted too)."""
    import psutil

    found: dict[str, dict[int, float]] = {}
    groups = {**pids, "postgres": [p.pid for p in psutil.process_iter(["name"])
                                   if p.info["name"] == "postgres"]}
    for name, members in groups.items():
        found[name] = {}
        for pid in members:
            try:
                times = psutil.Process(pid).cpu_times()
                found[name][pid] = times.user + times.system
            except psutil.Error:
                pass
    return found


def cpu_per_delivery(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]],
                     n: int) -> dict[str, int]:
    """µs per delivery of each group: processes that ended meanwhile are not counted."""
    used = {name: sum(t - before.get(name, {}).get(pid, 0.0) for pid, t in procs.items())
            for name, procs in after.items()}
    return {name: round(seconds / n * 1e6) for name, seconds in used.items()}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Setup:
    dsn: str
    pool: asyncpg.Pool
    receiver: subprocess.Popen[bytes]
    receiver_out: Path
    args: argparse.Namespace
    cpu: dict[str, dict[str, Any]] = field(default_factory=dict)


MODES = ("notify", "poll")


def start_dispatchers(s: Setup, mode: str) -> list[subprocess.Popen[bytes]]:
    poll = s.args.poll if mode == "notify" else s.args.baseline_poll
    return [spawn("--role", "dispatcher", "--dsn", s.dsn, "--concurrency", str(s.args.concurrency),
                  "--poll", str(poll), *(["--listen"] if mode == "notify" else []))
            for _ in range(s.args.dispatchers)]


async def wait_drained(conn: asyncpg.Connection, within: float) -> None:
    deadline = time.monotonic() + within
    while (left := await pending_count(conn)) > 0:
        if time.monotonic() > deadline:
            why = await conn.fetch(
                """SELECT status, attempts, last_error, count(*) FROM webhook_deliveries
                   GROUP BY 1, 2, 3 ORDER BY 4 DESC LIMIT 10""")
            raise RuntimeError(f"{left} deliveries still pending after {within:g} s: "
                               f"{[tuple(r) for r in why]}")
        await asyncio.sleep(0.1)


async def throughput(s: Setup, conn: asyncpg.Connection, run: str) -> list[str]:
    """Commit a backlog, then let the dispatchers drain it; the event ids."""
    backlog = s.args.backlog
    ids = []
    for start in range(0, backlog, 1000):
        batch = events(run, start, min(1000, backlog - start))
        await publish_batch(s.pool, batch, "notify")
        ids += [e.id for e in batch]
    dispatchers = start_dispatchers(s, "notify")
    pids = {"dispatchers": [p.pid for p in dispatchers], "receiver": [s.receiver.pid],
            "producer": [os.getpid()]}
    before = cpu_seconds(pids)
    try:
        await wait_drained(conn, 300)
        s.cpu["throughput"] = cpu_per_delivery(before, cpu_seconds(pids),
                                               len(ids) * s.args.endpoints)
    finally:
        for proc in dispatchers:
            stop(proc)
    return ids


async def latency(s: Setup, conn: asyncpg.Connection, run: str,
                  mode: str) -> tuple[float, dict[str, float]]:
    """Idle for a while, then commit events at the rate for the duration; (offered rate,
    commit time per event id)."""
    dispatchers = start_dispatchers(s, mode)
    committed: dict[str, float] = {}
    try:
        await asyncio.sleep(2.0)  # dispatchers up and polling
        pids = {"dispatchers": [p.pid for p in dispatchers], "receiver": [s.receiver.pid],
                "producer": [os.getpid()]}
        before = cpu_seconds(pids)
        await asyncio.sleep(s.args.idle)
        idle = cpu_seconds(pids)
        s.cpu[f"idle {mode}"] = {
            name: round(sum(t - before.get(name, {}).get(pid, 0.0) for pid, t in procs.items())
                        / s.args.idle * 1000, 1)
            for name, procs in idle.items() if name in ("dispatchers", "postgres")}
        before = idle
        total = int(s.args.rate * s.args.duration)
        sent = 0
        begin = time.monotonic()
        while sent < total:
            due = min(total, int((time.monotonic() - begin) * s.args.rate) + 1)
            if due > sent:
                batch = events(run, sent, due - sent)
                at = await publish_batch(s.pool, batch, mode)
                committed.update((e.id, at) for e in batch)
                sent = due
            await asyncio.sleep(0.01)
        offered = total / (time.monotonic() - begin)
        await wait_drained(conn, 60)
        s.cpu[f"latency {mode}"] = cpu_per_delivery(before, cpu_seconds(pids),
                                                    total * s.args.endpoints)
    finally:
        for proc in dispatchers:
            stop(proc)
    return offered, committed


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    name = f"creditgate_bench_wh_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(args.admin_database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    base, _, query = args.admin_database_url.partition("?")
    dsn = base.rsplit("/", 1)[0] + "/" + name + ("?" + query if query else "")
    receiver_out = Path(f"/tmp/{name}-receiver.json")
    receiver = None
    try:
        await migrate(dsn, ROOT / "migrations")
        from app.webhooks.signing import new_secret

        port, secret = free_port(), new_secret()
        receiver = spawn("--role", "receiver", "--port", str(port), "--secret", secret,
                         "--out", str(receiver_out))
        await wait_port(port)
        pool = await create_pool(dsn, 4)
        conn = await asyncpg.connect(dsn)
        for i in range(args.endpoints):
            await conn.execute(
                "INSERT INTO webhook_endpoints (url, secret, event_types) VALUES ($1, $2, $3)",
                f"http://127.0.0.1:{port}/hook/{i}", secret, [EVENT_TYPE])
        setup = Setup(dsn, pool, receiver, receiver_out, args)
        run = uuid.uuid4().hex
        backlog_ids = await throughput(setup, conn, run + "t")
        modes = {mode: await latency(setup, conn, run + "l" + mode, mode) for mode in MODES}
        await pool.close()
        await conn.close()
        stop(receiver)
        receiver = None
        got = json.loads(receiver_out.read_text())  # noqa: ASYNC240
        arrivals: dict[str, float] = got["arrivals"]
        paths = [f"/hook/{i}" for i in range(args.endpoints)]
        drained = [arrivals[f"{path} {i}"] for i in backlog_ids for path in paths]
        span = max(drained) - min(drained)
        latencies = {}
        for mode, (offered, committed) in modes.items():
            waits = [arrivals[f"{path} {i}"] - at for i, at in committed.items()
                     for path in paths if f"{path} {i}" in arrivals]
            missing = len(committed) * len(paths) - len(waits)
            assert not missing, f"{mode}: {missing} deliveries never arrived"
            latencies[mode] = {"events": len(committed), "offered_per_s": round(offered),
                               "deliveries_per_s": round(offered * args.endpoints),
                               "p50_ms": round(pct(waits, 0.5) * 1000, 1),
                               "p99_ms": round(pct(waits, 0.99) * 1000, 1),
                               "max_ms": round(max(waits) * 1000, 1)}
        return {
            "throughput": {"deliveries": len(drained), "seconds": round(span, 2),
                           "deliveries_per_s": round(len(drained) / span)},
            "latency": latencies,
            "cpu_us_per_delivery": setup.cpu,
            "receiver": {"repeated_ids": got["duplicates"], "signatures_checked": got["verified"],
                         "bad_signatures": got["bad"]},
        }
    finally:
        if receiver is not None:
            stop(receiver)
        receiver_out.unlink(missing_ok=True)  # noqa: ASYNC240
        admin = await asyncpg.connect(args.admin_database_url)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def report(args: argparse.Namespace, found: dict[str, Any]) -> None:
    t = found["throughput"]
    print(f"webhooks bench: {args.dispatchers} dispatcher process(es), concurrency "
          f"{args.concurrency} each, {args.endpoints} endpoint(s), {os.cpu_count()} CPUs; "
          f"notify: LISTEN + poll {args.poll * 1000:g} ms, baseline: poll "
          f"{args.baseline_poll * 1000:g} ms")
    print(f"  throughput (notify): {t['deliveries']} deliveries drained from a backlog in "
          f"{t['seconds']} s = {t['deliveries_per_s']}/s  "
          f"(x{t['deliveries_per_s'] / TARGET_PER_S:.2f} of the {TARGET_PER_S}/s target)")
    for mode, lat in found["latency"].items():
        print(f"  latency ({mode}) at {lat['deliveries_per_s']} deliveries/s "
              f"({lat['offered_per_s']} events/s) for {args.duration:g} s: p50 {lat['p50_ms']} ms,"
              f" p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms  "
              f"(p99 x{lat['p99_ms'] / 1000 / TARGET_P99_S:.2f} of the 1 s bound)")
    cpu = found["cpu_us_per_delivery"]
    print(f"  CPU µs per delivery: {cpu}")
    lat = found["latency"]
    idle = {mode: cpu[f"idle {mode}"] for mode in MODES}
    print(f"  ratios poll / notify: p50 x{lat['poll']['p50_ms'] / lat['notify']['p50_ms']:.2f}, "
          f"p99 x{lat['poll']['p99_ms'] / lat['notify']['p99_ms']:.2f}; idle CPU ms/s "
          f"dispatcher {idle['poll']['dispatchers']} / {idle['notify']['dispatchers']}, "
          f"postgres {idle['poll']['postgres']} / {idle['notify']['postgres']}")
    print(f"  receiver: {found['receiver']}")
    print(json.dumps(found))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--role", choices=["bench", "receiver", "dispatcher"], default="bench")
    parser.add_argument("--admin-database-url", default=os.environ.get(
        "BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--rate", type=int, default=TARGET_PER_S, help="events/s in phase 2")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of phase 2")
    parser.add_argument("--backlog", type=int, default=20_000, help="events of phase 1")
    parser.add_argument("--dispatchers", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=50, help="per dispatcher")
    parser.add_argument("--endpoints", type=int, default=1)
    parser.add_argument("--poll", type=float, default=1.0,
                        help="idle poll interval with notifications, s (the app's default)")
    parser.add_argument("--baseline-poll", type=float, default=0.1,
                        help="idle poll interval of the baseline (no notifications), s")
    parser.add_argument("--listen", action="store_true", help="(dispatcher role) LISTEN")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of the idle phase")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--secret", default="")
    parser.add_argument("--out", type=Path, default=Path("/dev/null"))
    parser.add_argument("--dsn", default="")
    args = parser.parse_args()
    import uvloop

    if args.role == "receiver":
        uvloop.run(serve_receiver(args.port, args.secret, args.out))
    elif args.role == "dispatcher":
        uvloop.run(run_dispatcher(args.dsn, args.concurrency, args.poll, args.listen))
    else:
        report(args, uvloop.run(bench(args)))


if __name__ == "__main__":
    main()
