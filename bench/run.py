"""creditgate benchmark: one run, every scenario, same server settings for all.

    .venv/bin/python bench/run.py [--duration 10] [--concurrency 64]

Servers run as subprocesses (granian, 1 worker, ASGI, no access log); the load comes from
`wrk` (apt-get install wrk) in its own process with Lua scripts from bench/lua. See
bench/README.md for what each scenario measures. Results: bench/results/latest.json and a
markdown table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
LUA = BENCH / "lua"
RESULTS = BENCH / "results"
VENV_BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))

from app.auth.keys import Scope, create_api_key  # noqa: E402
from app.db import migrate  # noqa: E402

TARGETS = {"check_over_bare": 0.7, "usage_over_naive": 2.0, "batch_events_per_s": 50_000}


@dataclass
class Result:
    name: str
    what: str
    server: str
    connections: int
    requests: int = 0
    duration_s: float = 0.0
    rps: float = 0.0
    events_per_s: float | None = None
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)


# --- servers -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


GRANIAN_LOOP = "auto"
WORKERS = 1


def granian_cmd(target: str, port: int, factory: bool, root: Path = ROOT) -> list[str]:
    """`root`: the tree whose `app` the server imports (run the server in it too: `server`)."""
    cmd = [str(VENV_BIN / "granian"), "--interface", "asgi", "--loop", GRANIAN_LOOP,
           "--workers", str(WORKERS), "--host",
           "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning",
           "--working-dir", str(root)]
    return [*cmd, "--factory", target] if factory else [*cmd, target]


def uvicorn_cmd(target: str, port: int) -> list[str]:
    return [str(VENV_BIN / "uvicorn"), target, "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(WORKERS), "--no-access-log", "--log-level", "warning", "--app-dir", str(ROOT)]


@contextmanager
def server(name: str, cmd: list[str], env: dict[str, str], probe: tuple[str, str, Any],
           port: int, pin: str | None, cwd: Path = ROOT,
           ) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Start a server subprocess in `cwd`, wait until `probe` (method, path, json) answers
    2xx. (granian imports the app of its working directory: `--working-dir` alone did not
    keep it from this tree's.)"""
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = open(RESULTS / f"server-{name}.log", "w")
    if pin:
        cmd = ["taskset", "-c", pin, *cmd]
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **env}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        method, path, body = probe
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} server exited; see {log.name}")
            try:
                r = httpx.request(method, base + path, json=body, timeout=2)
                if r.status_code < 300:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} server did not come up; see {log.name}")
            time.sleep(0.2)
        yield base, proc
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


# --- CPU accounting ------------------------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK")


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(entry))
    return kids


def cpu_of(pids: list[int]) -> dict[int, float]:
    """CPU seconds (user + system) of each live process."""
    out = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def tree(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def named(prefix: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/comm").read_text().strip().startswith(prefix):
                    found.append(int(entry))
            except OSError:
                continue
    return found


class CpuMeter:
    """CPU seconds used by the server process tree, redis-server and all postgres processes."""

    redis_pids: list[int] | None = None  # the private redis-server, when there is one

    def __init__(self, server_pid: int | None) -> None:
        self.groups = {"server": tree(server_pid) if server_pid else [],
                       "redis": self.redis_pids or named("redis-server"),
                       "postgres": named("postgres")}
        self.start = {k: cpu_of(v) for k, v in self.groups.items()}
        self.t0 = time.monotonic()
        self.used: dict[str, float] = {}

    def stop(self) -> dict[str, float]:
        """Percent of one CPU per group, over processes alive at start and stop."""
        wall = time.monotonic() - self.t0
        for k, pids in self.groups.items():
            now = cpu_of(pids)
            self.used[k] = sum(now[p] - self.start[k][p] for p in now if p in self.start[k])
        return {f"{k}_cpu_pct": round(100 * v / wall, 1) for k, v in self.used.items()}


# --- load generator ------------------------------------------------------------------------


def wrk(base: str, script: str, args: list[str], *, duration: float, connections: int,
        threads: int, timeout_s: int = 10, pin: str | None = None) -> dict[str, Any]:
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(duration))}s",
           "--timeout", f"{timeout_s}s", "-s", str(LUA / script), base, "--", *args]
    if pin:
        cmd = ["taskset", "-c", pin, *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("BENCHJSON "):
            data: dict[str, Any] = json.loads(line.removeprefix("BENCHJSON "))
            return data
    raise RuntimeError(f"wrk gave no summary:\n{out.stdout}\n{out.stderr}")


def measure(name: str, what: str, server_name: str, base: str, script: str,
            args_for: Any, opts: argparse.Namespace, *, server_pid: int | None = None,
            connections: int | None = None,
            events_per_request: int | None = None, timeout_s: int = 10) -> Result:
    conns = connections or opts.concurrency
    threads = min(opts.threads, conns)
    if opts.warmup > 0:
        wrk(base, script, args_for("warm"), duration=opts.warmup, connections=conns,
            threads=threads, timeout_s=timeout_s, pin=opts.pin_client)
    meter = CpuMeter(server_pid)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    raw = wrk(base, script, args_for("run"), duration=opts.duration, connections=conns,
              threads=threads, timeout_s=timeout_s, pin=opts.pin_client)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = meter.stop()
    seconds = raw["duration_us"] / 1e6
    errors = {k: v for k, v in raw["errors"].items() if v}
    res = Result(name, what, server_name, conns, raw["requests"], round(seconds, 2),
                 round(raw["requests"] / seconds, 1), None, raw["p50_us"] / 1000,
                 raw["p90_us"] / 1000, raw["p99_us"] / 1000, raw["max_us"] / 1000, errors)
    wrk_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    cpu["wrk_cpu_pct"] = round(100 * wrk_cpu / seconds, 1)
    res.notes["cpu"] = cpu
    if res.requests and server_pid:
        res.notes["server_cpu_us_per_request"] = round(1e6 * meter.used["server"] / res.requests, 1)
    if events_per_request:
        res.events_per_s = round(res.rps * events_per_request, 1)
        res.notes["events_per_request"] = events_per_request
    shown = f"{res.events_per_s:,.0f} events/s" if res.events_per_s else f"{res.rps:,.0f} req/s"
    print(f"  {name:<14} {shown:>20}  p50 {res.p50_ms:7.2f} ms  p99 {res.p99_ms:7.2f} ms"
          + f"  cpu% server {cpu['server_cpu_pct']:.0f} redis {cpu['redis_cpu_pct']:.0f}"
          f" pg {cpu['postgres_cpu_pct']:.0f} wrk {cpu['wrk_cpu_pct']:.0f}"
          + (f"  errors {errors}" if errors else ""), flush=True)
    return res


# --- data ----------------------------------------------------------------------------------


def with_database(url: str, name: str) -> str:
    base, _, query = url.partition("?")
    return base.rsplit("/", 1)[0] + "/" + name + ("?" + query if query else "")


async def prepare_database(admin_url: str, name: str, accounts: int) -> tuple[str, dict[str, str]]:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    url = with_database(admin_url, name)
    await migrate(url, ROOT / "migrations")
    conn = await asyncpg.connect(url)
    try:
        keys = {s.value: await create_api_key(conn, s, "bench") for s in (Scope.admin, Scope.runtime)}
        await conn.execute("""CREATE TABLE naive_balances (
                                  id integer PRIMARY KEY, remaining bigint NOT NULL)""")
        await conn.executemany("INSERT INTO naive_balances VALUES ($1, $2)",
                               [(i, 10**15) for i in range(1, accounts + 1)])
    finally:
        await conn.close()
    return url, keys


# redis-py 8's asyncio pool raises MaxConnectionsError beyond 100 connections by default;
# creditgate's own client has that default (see bench/README.md), so the URL lifts it.
REDIS_QUERY = "?max_connections=1024"


@contextmanager
def redis_server(choice: str) -> Iterator[str]:
    """A private redis-server (no persistence, like the shared one) or the given URL."""
    if choice != "private":
        yield choice if "max_connections" in choice else choice + REDIS_QUERY
        return
    if not shutil.which("redis-server"):
        raise SystemExit("redis-server not found; pass --redis-url redis://host:port/db")
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--daemonize", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("private redis-server did not start") from None
                time.sleep(0.05)
        client.close()
        CpuMeter.redis_pids = [proc.pid]
        yield f"redis://127.0.0.1:{port}/0{REDIS_QUERY}"
    finally:
        CpuMeter.redis_pids = None
        proc.terminate()
        proc.wait(timeout=10)


def prepare_redis(url: str) -> None:
    """The bench owns its Redis database index: empty it, refusing if it holds foreign keys."""
    r = redis.Redis.from_url(url)
    try:
        foreign = [k for k in r.scan_iter(count=1000) if not k.startswith(b"cg:")][:3]
        if foreign:
            raise SystemExit(f"{url} holds keys that are not creditgate's ({foreign!r}); "
                             "pick another --redis-db")
        r.flushdb()
    finally:
        r.close()


def create_catalog(base: str, admin_key: str, prefix: str, accounts: int) -> None:
    """Credit type, product, accounts and a large grant each, over the admin API."""
    headers = {"Authorization": f"Bearer {admin_key}"}
    with httpx.Client(base_url=base, headers=headers, timeout=30) as c:

        def post(path: str, body: dict[str, Any], exists_ok: bool = False) -> None:
            r = c.post(path, json=body)
            if r.status_code != 201 and not (exists_ok and r.status_code == 409):
                raise RuntimeError(f"POST {path}: {r.status_code} {r.text}")

        # (shared by the rounds of a run: only the accounts are new in each)
        post("/v1/credit-types", {"code": "usd", "name": "US dollar", "kind": "fiat",
                                  "decimal_places": 2}, exists_ok=True)
        post("/v1/products", {"code": "api", "name": "API calls"}, exists_ok=True)
        for a in range(accounts):
            code = f"{prefix}-{a}"
            post("/v1/accounts", {"code": code, "name": code, "credit_type": "usd"})
            post(f"/v1/accounts/{code}/grants", {"amount": "1000000000"})


def customer_tokens(base: str, key: str, prefix: str, accounts: int) -> list[str]:
    """A customer token (app/auth/tokens.py) for each account, in account order."""
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"},
                      timeout=30) as c:
        found = []
        for a in range(accounts):
            r = c.post(f"/v1/accounts/{prefix}-{a}/customer-tokens", json={"ttl_s": 86_400})
            if r.status_code != 201:
                raise RuntimeError(f"customer token for {prefix}-{a}: {r.status_code} {r.text}")
            found.append(r.json()["token"])
        return found


async def drop_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def count_usage(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM usage_events"))
    finally:
        await conn.close()


async def settle_usage(url: str, previous: int, wait_s: float = 5.0) -> int:
    """usage_events count once in-flight requests at wrk's stop have committed."""
    deadline, last = time.monotonic() + wait_s, -1
    while True:
        now = await count_usage(url)
        if now == last or time.monotonic() > deadline:
            return now - previous
        last = now
        await asyncio.sleep(0.5)


def pg_settings(url: str) -> dict[str, str]:
    async def read() -> dict[str, str]:
        conn = await asyncpg.connect(url)
        try:
            return {s: str(await conn.fetchval(f"SHOW {s}"))
                    for s in ("server_version", "synchronous_commit", "fsync", "commit_delay")}
        finally:
            await conn.close()

    return asyncio.run(read())


# --- report --------------------------------------------------------------------------------


def check_committed(res: Result, committed: int, events_per_request: int) -> None:
    """Every event answered 2xx must be in Postgres (a few more may land after wrk stops)."""
    res.notes["usage_events_committed"] = committed
    answered = (res.requests - res.errors.get("status", 0)) * events_per_request
    if committed < answered:
        print(f"    WARNING: {answered} events answered 2xx but only {committed} in usage_events")


def combine(rounds: list[dict[str, Result]]) -> dict[str, Result]:
    """Each scenario over all rounds: requests and seconds added up (so rates are totals over
    totals), latency percentiles and CPU per request the median of the rounds'. With one round,
    that round. Rounds interleave the scenarios, so a machine that speeds up or slows down
    during a run (this shared one does, by ±30%) weighs on every scenario alike."""
    if len(rounds) == 1:
        return rounds[0]
    combined: dict[str, Result] = {}
    for name, first in rounds[0].items():
        runs = [r[name] for r in rounds if name in r]
        seconds = sum(r.duration_s for r in runs)
        requests = sum(r.requests for r in runs)
        res = Result(first.name, first.what, first.server, first.connections, requests,
                     round(seconds, 2), round(requests / seconds, 1) if seconds else 0.0)
        for attr in ("p50_ms", "p90_ms", "p99_ms", "max_ms"):
            setattr(res, attr, statistics.median(getattr(r, attr) for r in runs))
        for r in runs:
            for key, value in r.errors.items():
                res.errors[key] = res.errors.get(key, 0) + value
        per_event = first.notes.get("events_per_request")
        if per_event:
            res.events_per_s = round(res.rps * per_event, 1)
            res.notes["events_per_request"] = per_event
        cpu = [r.notes["server_cpu_us_per_request"] for r in runs
               if "server_cpu_us_per_request" in r.notes]
        if cpu:
            res.notes["server_cpu_us_per_request"] = statistics.median(cpu)
        res.notes["rounds"] = [r.rps for r in runs]
        combined[name] = res
    return combined


def ratios(results: dict[str, Result]) -> dict[str, float | None]:
    def ratio(a: str, b: str) -> float | None:
        if a in results and b in results and results[b].rps:
            return round(results[a].rps / results[b].rps, 3)
        return None

    return {
        "check_over_bare": ratio("check", "bare"),
        "check_uncached_over_bare": ratio("check_uncached", "bare"),
        "check_over_uncounted": ratio("check", "check_uncounted"),
        "usage_over_naive": ratio("usage", "naive"),
        "batch_events_per_s": results["batch"].events_per_s if "batch" in results else None,
        "granian_over_uvicorn": ratio("bare", "bare_uvicorn"),
        "token_over_key": ratio("balances_token", "balances"),
        "hold_over_usage": ratio("hold", "usage"),
        "batch_over_statement": ratio("batch", "batch_statement"),
        "batch_over_baseline": ratio("batch", "batch_baseline"),
        "usage_over_baseline": ratio("usage", "usage_baseline"),
    }


def markdown(results: dict[str, Result], rat: dict[str, float | None], meta: dict[str, Any]) -> str:
    lines = [
        f"Run {meta['started_at']} on {meta['cpus']} CPUs, {meta['duration_s']:g} s per scenario"
        f"{' in each of ' + str(meta['rounds']) + ' rounds' if meta.get('rounds', 1) > 1 else ''}, "
        f"wrk {meta['wrk_threads']} thread(s), load average {meta['load_avg_before']} before / "
        f"{meta['load_avg_after']} after; commit {meta['git']}.",
        "",
        "| scenario | server | conns | req/s | events/s | p50 ms | p99 ms | server CPU µs/req "
        "| errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results.values():
        ev = f"{r.events_per_s:,.0f}" if r.events_per_s else ""
        err = ", ".join(f"{k} {v}" for k, v in r.errors.items()) or "0"
        rps = f"{r.rps:,.1f}" if r.rps < 100 else f"{r.rps:,.0f}"
        cpu = r.notes.get("server_cpu_us_per_request")
        lines.append(f"| {r.name} — {r.what} | {r.server} | {r.connections} | {rps} | {ev} "
                     f"| {r.p50_ms:.2f} | {r.p99_ms:.2f} | {'' if cpu is None else f'{cpu:,.0f}'} "
                     f"| {err} |")
    per_round = meta.get("round_ratios") or []
    lines += ["", "| ratio | value | target | met |"
              + (" rounds |" if len(per_round) > 1 else ""),
              "|---|---:|---:|---|" + ("---|" if len(per_round) > 1 else "")]
    for key, label in [("check_over_bare", "check / bare"),
                       ("check_uncached_over_bare", "check with the cache off / bare"),
                       ("check_over_uncounted", "check / check with request metrics off"),
                       ("usage_over_naive", "usage / naive"),
                       ("batch_events_per_s", "batch events/s"),
                       ("granian_over_uvicorn", "granian / uvicorn (bare)"),
                       ("token_over_key", "balances: customer token / runtime key"),
                       ("hold_over_usage", "hold / usage (one event)"),
                       ("batch_over_statement", "batch / batch flushed by statement"),
                       ("usage_over_baseline", "usage / usage at --baseline"),
                       ("batch_over_baseline", "batch / batch at --baseline")]:
        value, target = rat.get(key), TARGETS.get(key)
        shown = "n/a" if value is None else (f"{value:,.0f}" if value > 100 else f"{value:.2f}")
        tshown = "" if target is None else (f">= {target:,}" if target > 100 else f">= {target}")
        met = "" if target is None or value is None else ("yes" if value >= target else "**no**")
        spread = ""
        if len(per_round) > 1:
            values = [r.get(key) for r in per_round]
            spread = " " + ", ".join("n/a" if v is None else (f"{v:,.0f}" if v > 100 else f"{v:.2f}")
                                     for v in values) + " |"
        lines.append(f"| {label} | {shown} | {tshown} | {met} |{spread}")
    return "\n".join(lines)


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "app", "migrations"],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# --- main ----------------------------------------------------------------------------------


ALL = ("bare", "bare_redis", "bare_fast", "bare_uvicorn", "naive", "check", "check_uncached",
       "check_uncounted", "usage", "hold", "batch", "batch_statement", "balances",
       "balances_token", "usage_baseline", "batch_baseline")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=10, help="seconds measured per scenario")
    p.add_argument("--warmup", type=int, default=2, help="seconds of warm-up before each")
    p.add_argument("--concurrency", type=int, default=64, help="open connections (single requests)")
    p.add_argument("--batch-concurrency", type=int, default=2,
                   help="open connections for the 1,000-event batches (2 measured best here)")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1, help="wrk threads")
    p.add_argument("--accounts", type=int, default=100, help="accounts the load is spread over")
    p.add_argument("--scenarios", default=None,
                   help=f"subset of {','.join(ALL)} (default: all, the *_baseline ones only "
                        "with --baseline)")
    p.add_argument("--admin-database-url",
                   default=os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"),
                   help="a Postgres URL with CREATEDB rights; the bench database is made beside it")
    p.add_argument("--db-name", default=None,
                   help="default: creditgate_bench_<random>, created here and dropped at the end")
    p.add_argument("--keep-db", action="store_true", help="do not drop the bench database")
    p.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "private"),
                   help="`private` (default): start an own redis-server on a free port, so the "
                        "tests' FLUSHALL on the shared one cannot disturb the run; or the URL of "
                        "a Redis database the bench owns (it is flushed)")
    p.add_argument("--pin-server", default=None, help="taskset CPU list for the server, e.g. 0")
    p.add_argument("--pin-client", default=None, help="taskset CPU list for wrk, e.g. 1")
    p.add_argument("--profile", default="",
                   help="scenarios to record with py-spy during the measured run (e.g. check,usage)")
    p.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop", "rloop"],
                   help="granian --loop for every granian server (auto: uvloop if importable)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every scenario this many times, interleaved; rates are totals "
                        "over all rounds, and the ratios of each round are printed too")
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                   help="a setting for every creditgate server (repeatable), e.g. "
                        "CREDITGATE_JOURNAL_COPY_ROWS=32")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes of every server (the same for all scenarios)")
    p.add_argument("--baseline", default=None, metavar="REV",
                   help="a git revision whose code serves the usage_baseline and "
                        "batch_baseline scenarios (against the same database, migrated by "
                        "this tree: the revision must take its schema), for the ratios usage "
                        "/ usage_baseline and batch / batch_baseline of a change")
    opts = p.parse_args()
    global GRANIAN_LOOP, WORKERS
    GRANIAN_LOOP = opts.loop
    WORKERS = opts.workers
    everything = [s for s in ALL if opts.baseline or not s.endswith("_baseline")]
    wanted = [s.strip() for s in (opts.scenarios or ",".join(everything)).split(",") if s.strip()]
    if any("=" not in e for e in opts.server_env):
        p.error("--server-env takes NAME=VALUE")
    unknown = set(wanted) - set(ALL)
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}")
    if bool(opts.baseline) != any(s.endswith("_baseline") for s in wanted):
        p.error("--baseline REV goes with the scenarios usage_baseline and batch_baseline")
    if not shutil.which("wrk"):
        raise SystemExit("wrk is required: apt-get install -y wrk")
    RESULTS.mkdir(parents=True, exist_ok=True)

    load1 = os.getloadavg()[0]
    if load1 > 0.5:
        print(f"warning: load average is {load1:.2f} before starting; numbers may be noisy",
              flush=True)
    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    t0 = time.monotonic()
    prefix = f"bench-{uuid.uuid4().hex[:6]}"
    db_name = opts.db_name or f"creditgate_bench_{uuid.uuid4().hex[:8]}"
    db_url, keys = asyncio.run(prepare_database(opts.admin_database_url, db_name, opts.accounts))
    rounds: list[dict[str, Result]] = []
    try:
        with redis_server(opts.redis_url) as redis_url, baseline_tree(opts.baseline) as tree:
            opts.baseline_tree = tree
            opts.redis_url = redis_url
            for n in range(opts.rounds):
                if opts.rounds > 1:
                    print(f"round {n + 1} of {opts.rounds}", flush=True)
                found, meta = run_all(opts, wanted, db_url, keys, f"{prefix}r{n}",
                                      swap=n % 2 == 1)
                rounds.append(found)
    finally:
        if not opts.keep_db:
            asyncio.run(drop_database(opts.admin_database_url, db_name))
    results = combine(rounds)
    meta.update(started_at=started, load_avg_before=round(load1, 2),
                load_avg_after=round(os.getloadavg()[0], 2),
                total_s=round(time.monotonic() - t0, 1), database=db_name, rounds=opts.rounds,
                round_ratios=[ratios(r) for r in rounds])
    rat = ratios(results)
    out = {"meta": meta, "results": {k: asdict(v) for k, v in results.items()}, "ratios": rat,
           "targets": TARGETS}
    (RESULTS / "latest.json").write_text(json.dumps(out, indent=2) + "\n")
    print()
    print(markdown(results, rat, meta))
    print(f"\n(results in {RESULTS / 'latest.json'}; {meta['total_s']} s in all)")


@contextmanager
def baseline_tree(rev: str | None) -> Iterator[Path | None]:
    """The files of `rev` (git archive) in a temporary folder, for the baseline's server."""
    if rev is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="creditgate-baseline-") as tmp:
        archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        print(f"baseline: the code of {rev} in {tmp}", flush=True)
        yield Path(tmp)


def run_all(opts: argparse.Namespace, wanted: list[str], db_url: str, keys: dict[str, str],
            prefix: str, swap: bool = False) -> tuple[dict[str, Result], dict[str, Any]]:
    prepare_redis(opts.redis_url)
    ts = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    results: dict[str, Result] = {}
    pin = opts.pin_server
    bare_probe = ("POST", "/bare", {"account": "x"})

    def static_args(kind: str, token: str = "-") -> Any:
        return lambda _run: [kind, str(opts.accounts), prefix, token]

    def run_scenario(name: str, *a: Any, **kw: Any) -> None:
        proc = kw.pop("proc")
        kw["server_pid"] = proc.pid
        if name not in opts.profile.split(","):
            results[name] = measure(name, *a, **kw)
            return
        out = RESULTS / f"profile-{name}.txt"
        spy = subprocess.Popen([str(VENV_BIN / "py-spy"), "record", "--pid", str(proc.pid),
                                "--subprocesses", "--nonblocking", "--rate", "250",
                                "--format", "raw", "--output", str(out),
                                "--duration", str(int(opts.duration + opts.warmup + 2))],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            results[name] = measure(name, *a, **kw)
        finally:
            spy.wait()
        print(f"    py-spy collapsed stacks: {out} (summary: bench/profile_top.py {out})")

    def serve_static(name: str, what: str, cmd: Callable[[int], list[str]], env: dict[str, str],
                     probe: tuple[str, str, Any], kind: str, token: str = "-",
                     server_kind: str = "granian", setup: Callable[[str], None] | None = None,
                     ) -> None:
        """One `static.lua` scenario against a server of its own."""
        port = free_port()
        with server(name, cmd(port), env, probe, port, pin) as (base, proc):
            if setup is not None:
                setup(base)
            run_scenario(name, what, server_kind, base, "static.lua", static_args(kind, token),
                         opts, proc=proc)

    def bare_app(port: int) -> list[str]:
        return granian_cmd("bench.bare:app", port, False)

    bare_redis_env = {"BARE_REDIS_URL": opts.redis_url}
    if "bare" in wanted:
        serve_static("bare", "bare Starlette JSON endpoint", bare_app, {}, bare_probe, "bare")
    if "bare_redis" in wanted:
        serve_static("bare_redis", "bare + one redis-py EVALSHA", bare_app, bare_redis_env,
                     bare_probe, "bare_redis")
    if "bare_fast" in wanted:
        serve_static("bare_fast", "bare + one EVALSHA through app/hotstate/resp.py", bare_app,
                     bare_redis_env, bare_probe, "bare_fast")
    if "bare_uvicorn" in wanted:
        serve_static("bare_uvicorn", "bare endpoint under uvicorn",
                     lambda port: uvicorn_cmd("bench.bare:app", port), {}, bare_probe, "bare",
                     server_kind="uvicorn")
    if "naive" in wanted:
        serve_static("naive", "one UPDATE … RETURNING per debit",
                     lambda port: granian_cmd("bench.naive:create_app", port, True),
                     {"NAIVE_DATABASE_URL": db_url},
                     ("POST", "/debit", {"account": 1, "amount": 0}), "naive")

    def run_batch(name: str, base: str, proc: subprocess.Popen[bytes], token: str) -> None:
        before = asyncio.run(count_usage(db_url))
        run_scenario(name, f"POST /v1/usage, {opts.batch_size:,} events", "granian", base,
                     "batch.lua",
                     lambda run: [str(opts.accounts), prefix, token, f"{prefix}-{name}{run}", ts,
                                  str(opts.batch_size)],
                     opts, proc=proc, connections=opts.batch_concurrency,
                     events_per_request=opts.batch_size, timeout_s=60)
        check_committed(results[name], asyncio.run(settle_usage(db_url, before)),
                        opts.batch_size)

    server_env = dict(e.split("=", 1) for e in opts.server_env)
    made: list[str] = []  # the round's accounts exist (made through the first server up)

    def catalog(base: str) -> None:
        if not made:
            create_catalog(base, keys["admin"], prefix, opts.accounts)
            made.append(base)

    @contextmanager
    def app_server(name: str, setting: dict[str, str] | None = None,
                   tree: Path = ROOT) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
        """A creditgate server of `tree`'s code (run in it), with `setting` beside --server-env,
        up and with the round's accounts."""
        port = free_port()
        env = {"DATABASE_URL": db_url, "REDIS_URL": opts.redis_url, **server_env,
               **(setting or {})}
        with server(name, granian_cmd("app.main:create_app_from_env", port, True, tree), env,
                    ("GET", "/healthz", None), port, pin, cwd=tree) as (base, proc):
            catalog(base)
            yield base, proc

    def batch_by_statement() -> None:
        """The batches from a server that flushes every one by statement, not COPY (run first
        in every other round, so neither way always meets the larger tables)."""
        with app_server("batch_statement", {"CREDITGATE_JOURNAL_COPY_ROWS": "0"}) as (base, proc):
            run_batch("batch_statement", base, proc, keys["runtime"])

    def from_baseline() -> None:
        """Single usage and batches from a server running the code of --baseline (run first
        in every other round, as batch_statement)."""
        with app_server("baseline", tree=opts.baseline_tree) as (base, proc):
            if "usage_baseline" in wanted:
                run_usage("usage_baseline", base, proc, keys["runtime"])
            if "batch_baseline" in wanted:
                run_batch("batch_baseline", base, proc, keys["runtime"])

    def run_usage(name: str, base: str, proc: subprocess.Popen[bytes], token: str) -> None:
        before = asyncio.run(count_usage(db_url))
        run_scenario(name, "POST /v1/usage, 1 event", "granian", base, "usage.lua",
                     lambda run: [str(opts.accounts), prefix, token, f"{prefix}-{name}{run}", ts],
                     opts, proc=proc)
        check_committed(results[name], asyncio.run(settle_usage(db_url, before)), 1)

    baselines = opts.baseline_tree is not None
    if swap and baselines:
        from_baseline()
    if swap and "batch_statement" in wanted:
        batch_by_statement()
    app_scenarios = [s for s in ("check", "usage", "hold", "batch", "balances",
                                 "balances_token") if s in wanted]
    if app_scenarios:
        with app_server("creditgate") as (base, proc):
            token = keys["runtime"]
            if "check" in app_scenarios:
                run_scenario("check", "POST /v1/check (no consume)", "granian", base,
                             "static.lua", static_args("check", token), opts, proc=proc)
            if "usage" in app_scenarios:
                run_usage("usage", base, proc, token)
            if "hold" in app_scenarios:
                run_scenario("hold", "POST /v1/accounts/{code}/holds, 0.01 held", "granian",
                             base, "usage.lua",
                             lambda run: [str(opts.accounts), prefix, token, f"{prefix}-h{run}",
                                          ts, "hold"], opts, proc=proc)
            if "batch" in app_scenarios:
                run_batch("batch", base, proc, token)
            # the two reads in turn, the first one first in even rounds only: whichever runs
            # first in a round measured faster, by as much as the difference looked for
            reads = [("balances", "runtime key", "-"), ("balances_token",
                     "each account's customer token", None)]
            for name, how, tokens in reads[::-1] if swap else reads:
                if name in app_scenarios:
                    shown = tokens or ",".join(customer_tokens(base, token, prefix,
                                                               opts.accounts))
                    run_scenario(name, f"GET /v1/accounts/{{code}}/balances, {how}", "granian",
                                 base, "balances.lua",
                                 lambda _run, t=shown: [str(opts.accounts), prefix, token, t],
                                 opts, proc=proc)

    if not swap and "batch_statement" in wanted:
        batch_by_statement()
    if not swap and baselines:
        from_baseline()
    # the same checks from servers with one setting off: every check decided in Redis
    # (CREDITGATE_CHECK_CACHE=0), nothing counted for /metrics (CREDITGATE_REQUEST_METRICS=0)
    for name, what, setting in (
            ("check_uncached", "check cache off", "CREDITGATE_CHECK_CACHE"),
            ("check_uncounted", "request metrics off", "CREDITGATE_REQUEST_METRICS")):
        if name not in wanted:
            continue
        serve_static(name, f"POST /v1/check, {what}",
                     lambda port: granian_cmd("app.main:create_app_from_env", port, True),
                     {"DATABASE_URL": db_url, "REDIS_URL": opts.redis_url, **server_env,
                      setting: "0"},
                     ("GET", "/healthz", None), "check", keys["runtime"], setup=catalog)

    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    import granian

    meta = {
        "git": git_rev(), "cpus": os.cpu_count(),
        "platform": platform.platform(), "python": platform.python_version(),
        "granian": granian.__version__, "wrk": wrk_version.strip(),
        "duration_s": opts.duration, "warmup_s": opts.warmup, "wrk_threads": opts.threads,
        "concurrency": opts.concurrency, "batch_concurrency": opts.batch_concurrency,
        "batch_size": opts.batch_size, "accounts": opts.accounts, "granian_loop": opts.loop,
        "workers": opts.workers, "server_env": opts.server_env, "baseline": opts.baseline,
        "redis_url": opts.redis_url, "pin_server": opts.pin_server, "pin_client": opts.pin_client,
        "postgres": pg_settings(db_url),
    }
    return results, meta


if __name__ == "__main__":
    main()
