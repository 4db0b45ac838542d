"""Balance streams against polling: what a dashboard that shows each customer its credits costs
the server, and how soon it shows a debit, pushed or polled at the same interval, same run.

    .venv/bin/python bench/streams.py [--watchers 200] [--interval-ms 500] [--usage-rate 100]

One creditgate server (granian, 1 worker, no access log: `bench/run.py`'s settings and
helpers) with `CREDITGATE_STREAM_POLL_MS` = the interval, one database, one private
redis-server, one account per watcher (each with its customer token). Two scenarios, each
`--duration` seconds while a driver in this process sends `--usage-rate` usage events a second
(0.01 each, round-robin over the accounts):

* `stream`: each watcher holds `GET /v1/accounts/{code}/balances/stream` open;
* `poll`: each watcher sends `GET /v1/accounts/{code}/balances` every interval (the baseline:
  what a page does without streams, at the same freshness);
* `none`: the usage driver alone, so that what the watchers cost can be told from it.

Measured: the server's CPU (its process tree, from /proc), Redis's, and the delay from the
moment a usage event is sent to the first answer a watcher gets that shows it (a stream's
answer may come before the event's acknowledgement: the hot state moves, and wakes the stream,
before the commit the acknowledgement waits for). Printed: a
table, each scenario's server CPU beyond `none` per watcher, and the ratio poll / stream of
that (how much less a stream costs than polling at the same interval).
Results: bench/results/streams.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as core  # bench/run.py: server, CPU and database machinery

GRANT = Decimal("1000000000")
STEP = Decimal("0.01")


@dataclass
class Seen:
    """Per account: when each of its usage events was sent, and how many the watcher has seen
    so far; the delays of the ones it saw."""

    sent: dict[str, dict[int, float]] = field(default_factory=dict)
    shown: dict[str, int] = field(default_factory=dict)
    delays: list[float] = field(default_factory=list)
    answers: int = 0

    def saw(self, account: str, available: str) -> None:
        self.answers += 1
        used = int((GRANT - Decimal(available)) / STEP)
        if account not in self.shown:  # the first answer: what earlier scenarios used
            self.shown[account] = used
            return
        now = time.monotonic()
        for k in range(self.shown.get(account, 0) + 1, used + 1):
            at = self.sent.get(account, {}).get(k)
            self.delays.append(max(0.0, now - at) if at is not None else 0.0)
        self.shown[account] = max(self.shown.get(account, 0), used)


async def drive(base: str, runtime: str, accounts: list[str], rate: float, stop: asyncio.Event,
                seen: Seen) -> int:
    sent = 0
    counts = {a: seen.shown.get(a, 0) for a in accounts}  # what the watchers saw before
    ts = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    async with httpx.AsyncClient(base_url=base, timeout=30,
                                 headers={"Authorization": f"Bearer {runtime}"}) as c:
        start = time.monotonic()
        while not stop.is_set():
            account = accounts[sent % len(accounts)]
            counts[account] += 1
            k = counts[account]
            seen.sent.setdefault(account, {})[k] = time.monotonic()
            r = await c.post("/v1/usage", json={"uid": uuid.uuid4().hex, "account": account,
                                                "product": "api", "amount": str(STEP),
                                                "timestamp": ts})
            r.raise_for_status()
            sent += 1
            await asyncio.sleep(max(0.0, start + sent / rate - time.monotonic()))
    return sent


def available(body: dict[str, Any]) -> str:
    return str(body["totals"][0]["available"])


async def stream_watcher(client: httpx.AsyncClient, account: str, token: str,
                         seen: Seen) -> None:
    async with client.stream("GET", f"/v1/accounts/{account}/balances/stream",
                             params={"access_token": token}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():  # until the scenario cancels it
            if line.startswith("data: "):
                seen.saw(account, available(json.loads(line[6:])))


async def poll_watcher(client: httpx.AsyncClient, account: str, token: str, seen: Seen,
                       stop: asyncio.Event, interval_s: float) -> None:
    next_at = time.monotonic()
    while not stop.is_set():
        r = await client.get(f"/v1/accounts/{account}/balances",
                             headers={"Authorization": f"Bearer {token}"})
        r.raise_for_status()
        seen.saw(account, available(r.json()))
        next_at += interval_s
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))


async def scenario(name: str, opts: argparse.Namespace, base: str, server_pid: int,
                   runtime: str, accounts: list[str], tokens: list[str]) -> dict[str, Any]:
    seen, stop = Seen(), asyncio.Event()
    limits = httpx.Limits(max_connections=len(accounts) + 10)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as client:
        pairs = list(zip(accounts, tokens, strict=True))
        if name == "none":
            watchers = []
        elif name == "stream":
            watchers = [stream_watcher(client, a, t, seen) for a, t in pairs]
        else:
            watchers = [poll_watcher(client, a, t, seen, stop, opts.interval_ms / 1000)
                        for a, t in pairs]
        tasks = [asyncio.create_task(w) for w in watchers]
        await asyncio.sleep(opts.warmup)
        answers_before, delays_before = seen.answers, len(seen.delays)
        meter = core.CpuMeter(server_pid)
        driver = asyncio.create_task(drive(base, runtime, accounts, opts.usage_rate, stop, seen))
        await asyncio.sleep(opts.duration)
        cpu = meter.stop()
        answers = seen.answers - answers_before
        stop.set()
        sent = await driver
        await asyncio.sleep(opts.interval_ms / 1000 * 2)  # the last events reach the watchers
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    delays = sorted(seen.delays[delays_before:])

    def pct(q: float) -> float:
        return round(1000 * delays[min(len(delays) - 1, int(q * len(delays)))], 1) if delays \
            else float("nan")

    return {"scenario": name, "watchers": len(accounts), "usage_sent": sent,
            "answers_per_s": round(answers / opts.duration, 1),
            "server_cpu_pct": cpu["server_cpu_pct"], "redis_cpu_pct": cpu["redis_cpu_pct"],
            "delay_p50_ms": pct(0.5), "delay_p99_ms": pct(0.99),
            "delay_mean_ms": round(1000 * statistics.fmean(delays), 1) if delays else None,
            "seen": len(delays)}


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--watchers", type=int, default=100)
    p.add_argument("--interval-ms", type=int, default=500)
    p.add_argument("--usage-rate", type=float, default=100.0)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--admin-database-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    opts = p.parse_args()
    name = f"creditgate_bench_st_{uuid.uuid4().hex[:8]}"
    db_url, keys = await core.prepare_database(opts.admin_database_url, name, 1)
    results: list[dict[str, Any]] = []
    try:
        with core.redis_server("private") as redis_url:
            port = core.free_port()
            env = {"DATABASE_URL": db_url, "REDIS_URL": redis_url,
                   "CREDITGATE_STREAM_POLL_MS": str(opts.interval_ms)}
            with core.server("streams", core.granian_cmd("app.main:create_app_from_env", port,
                                                         True), env,
                             ("GET", "/healthz", None), port, None) as (base, proc):
                prefix = f"st{uuid.uuid4().hex[:4]}"
                await asyncio.to_thread(core.create_catalog, base, keys["admin"], prefix,
                                        opts.watchers)
                tokens = await asyncio.to_thread(core.customer_tokens, base, keys["runtime"],
                                                 prefix, opts.watchers)
                accounts = [f"{prefix}-{a}" for a in range(opts.watchers)]
                for round_no in range(opts.rounds):
                    order = ("none", "stream", "poll") if round_no % 2 == 0 else \
                        ("none", "poll", "stream")
                    for scenario_name in order:
                        out = await scenario(scenario_name, opts, base, proc.pid,
                                             keys["runtime"], accounts, tokens)
                        out["round"] = round_no + 1
                        results.append(out)
                        print(f"  {scenario_name:7} server {out['server_cpu_pct']:5.1f}% "
                              f"redis {out['redis_cpu_pct']:5.1f}%  answers/s "
                              f"{out['answers_per_s']:8.1f}  delay p50 {out['delay_p50_ms']} ms "
                              f"p99 {out['delay_p99_ms']} ms  ({out['seen']} debits seen)",
                              flush=True)
    finally:
        await core.drop_database(opts.admin_database_url, name)

    def mean(kind: str, key: str) -> float:
        return statistics.fmean(r[key] for r in results if r["scenario"] == kind)

    base = mean("none", "server_cpu_pct")
    # server CPU per watcher beyond the driver's, in µs per second of watching
    cost = {k: max(mean(k, "server_cpu_pct") - base, 0.0) * 10_000 / opts.watchers
            for k in ("stream", "poll")}
    ratio = cost["poll"] / max(cost["stream"], 1.0)
    meta = {"at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "commit": core.git_rev(),
            "watchers": opts.watchers, "interval_ms": opts.interval_ms,
            "usage_rate": opts.usage_rate, "duration_s": opts.duration}
    core.RESULTS.mkdir(parents=True, exist_ok=True)
    (core.RESULTS / "streams.json").write_text(json.dumps(
        {"meta": meta, "results": results, "server_us_per_watcher_s": cost,
         "poll_over_stream_server_cpu": round(ratio, 2)},
        indent=2) + "\n")
    print(f"\n{opts.watchers} watchers, every {opts.interval_ms} ms, {opts.usage_rate:g} usage "
          f"events/s, commit {meta['commit']}")
    print("| scenario | round | server CPU % | Redis CPU % | answers/s | delay p50 ms | "
          "delay p99 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['scenario']} | {r['round']} | {r['server_cpu_pct']} | {r['redis_cpu_pct']} "
              f"| {r['answers_per_s']} | {r['delay_p50_ms']} | {r['delay_p99_ms']} |")
    print(f"\nserver CPU per watcher beyond the driver's: stream {cost['stream']:.0f} µs/s, "
          f"poll {cost['poll']:.0f} µs/s; poll / stream: {ratio:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
