"""Rating benchmark: measurement throughput against the core's direct usage path, same run.

    .venv/bin/python bench/measurements.py [--duration 10] [--concurrency 64] [--profile measure]

One creditgate server (granian, 1 worker, no access log: `bench/run.py`'s settings and
helpers), one database, one private redis-server, 100 accounts with a large USD grant. Four
scenarios, loaded by `wrk` with `bench/lua/usage.lua`, `batch.lua` and `measure.lua`:

* `usage`: `POST /v1/usage`, one event of 0.01 (the core's direct debit);
* `measure`: `POST /v1/measurements`, one measurement `{"calls": 1}` on a meter whose SUM is
  priced per unit at 0.01 on every account's plan: each one is stored and moves the
  aggregation state, and the measurements rated together (one group commit) draw one debit per
  account through the same usage path (0.01 for each of that account's measurements);
* `batch` / `measure_batch`: the same with 1,000 events / measurements per request, spread over
  the accounts (2 connections, as in `bench/run.py`): a 1,000-measurement request draws ~100
  debits, where a 1,000-event usage batch writes 1,000. `--accounts 1000` is the case where
  nothing coalesces (each measurement of a batch on its own account).

Printed: a table, and the ratios measure / usage and measure_batch / batch (target >= 0.7).
Results: bench/results/measurements.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as core  # bench/run.py: server, wrk and CPU machinery

TARGET = 0.7
SCENARIOS = ("usage", "measure", "batch", "measure_batch")


def create_rating(base: str, admin_key: str, prefix: str, accounts: int, start: str) -> str:
    """A meter, a SUM of its `calls` priced per unit at 0.01 USD, a plan on every account."""
    headers = {"Authorization": f"Bearer {admin_key}"}
    meter = f"{prefix}-calls"
    with httpx.Client(base_url=base, headers=headers, timeout=30) as c:

        def post(path: str, body: dict[str, Any]) -> None:
            r = c.post(path, json=body)
            if r.status_code != 201:
                raise RuntimeError(f"POST {path}: {r.status_code} {r.text}")

        post("/v1/meters", {"code": meter, "name": "API calls", "product": "api",
                            "data_fields": [{"code": "calls", "category": "measure"}]})
        post("/v1/aggregations", {"code": f"{prefix}-sum", "name": "calls", "meter": meter,
                                  "target_field": "calls", "function": "SUM"})
        post("/v1/plan-templates", {"code": f"{prefix}-t", "name": "t", "product": "api",
                                    "bill_frequency": "monthly", "currency": "usd"})
        post("/v1/plans", {"code": f"{prefix}-plan", "name": "p", "template": f"{prefix}-t"})
        post("/v1/pricings", {"plan": f"{prefix}-plan", "aggregation": f"{prefix}-sum",
                              "start_date": start, "type": "per_unit",
                              "bands": [{"up_to": None, "price": "0.01"}]})
        for a in range(accounts):
            post(f"/v1/accounts/{prefix}-{a}/plans", {"plan": f"{prefix}-plan",
                                                      "start_date": start})
    return meter


async def count(url: str, table: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
    finally:
        await conn.close()


async def settle(url: str, table: str, previous: int, wait_s: float = 5.0) -> int:
    deadline, last = time.monotonic() + wait_s, -1
    while True:
        now = await count(url, table)
        if now == last or time.monotonic() > deadline:
            return now - previous
        last = now
        await asyncio.sleep(0.5)


def check_rated(res: core.Result, stored: int, debits: int, used: int, size: int) -> None:
    """Every measurement answered 2xx must be stored, and every rated debit written in its
    rating transaction must have reached the usage path (a group of measurements draws one
    debit per account and pricing, so there are fewer debits than measurements)."""
    res.notes.update(measurements_stored=stored, rated_debits=debits, usage_events=used)
    answered = (res.requests - res.errors.get("status", 0)) * size
    if stored < answered:
        print(f"    WARNING: {answered} measurements answered 2xx but only {stored} stored")
    if used < debits:
        print(f"    WARNING: {debits} rated debits but only {used} new usage events")


def markdown(results: dict[str, core.Result], rat: dict[str, float | None],
             meta: dict[str, Any]) -> str:
    lines = [
        f"Run {meta['started_at']} on {meta['cpus']} CPUs, {meta['duration_s']:g} s per scenario"
        f"{' in each of ' + str(meta['rounds']) + ' rounds' if meta['rounds'] > 1 else ''}, "
        f"load average {meta['load_avg_before']} before / {meta['load_avg_after']} after; "
        f"commit {meta['git']}.",
        "",
        "| scenario | conns | req/s | events/s | p50 ms | p99 ms | server CPU µs/req | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results.values():
        ev = f"{r.events_per_s:,.0f}" if r.events_per_s else f"{r.rps:,.0f}"
        err = ", ".join(f"{k} {v}" for k, v in r.errors.items()) or "0"
        rps = f"{r.rps:,.1f}" if r.rps < 100 else f"{r.rps:,.0f}"
        cpu = r.notes.get("server_cpu_us_per_request")
        lines.append(f"| {r.name} — {r.what} | {r.connections} | {rps} | {ev} | {r.p50_ms:.2f} "
                     f"| {r.p99_ms:.2f} | {'' if cpu is None else f'{cpu:,.0f}'} | {err} |")
    per_round = meta.get("round_ratios") or []
    several = len(per_round) > 1
    lines += ["", "| ratio | value | target | met |" + (" rounds |" if several else ""),
              "|---|---:|---:|---|" + ("---|" if several else "")]
    for key, label in (("measure_over_usage", "measure / usage (single)"),
                       ("measure_batch_over_batch", "measure_batch / batch (1,000)")):
        value = rat.get(key)
        shown = "n/a" if value is None else f"{value:.2f}"
        met = "" if value is None else ("yes" if value >= TARGET else "**no**")
        rounds = ", ".join("n/a" if r.get(key) is None else f"{r[key]:.2f}" for r in per_round)
        lines.append(f"| {label} | {shown} | >= {TARGET} | {met} |"
                     + (f" {rounds} |" if several else ""))
    return "\n".join(lines)


def events(r: core.Result | None) -> float | None:
    return None if r is None else (r.events_per_s or r.rps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=10, help="seconds measured per scenario")
    p.add_argument("--warmup", type=int, default=2, help="seconds of warm-up before each")
    p.add_argument("--concurrency", type=int, default=64, help="connections (single requests)")
    p.add_argument("--batch-concurrency", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1, help="wrk threads")
    p.add_argument("--accounts", type=int, default=100)
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--admin-database-url",
                   default=os.environ.get("BENCH_DATABASE_URL",
                                          "postgresql://postgres@127.0.0.1:5432/test"))
    p.add_argument("--keep-db", action="store_true")
    p.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "private"))
    p.add_argument("--pin-server", default=None)
    p.add_argument("--pin-client", default=None)
    p.add_argument("--profile", default="", help="scenarios to record with py-spy")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every scenario this many times, interleaved, as bench/run.py does: "
                        "rates over all rounds, and each round's ratios printed too")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes of the server (the same for every scenario)")
    opts = p.parse_args()
    core.WORKERS = opts.workers
    wanted = [s.strip() for s in opts.scenarios.split(",") if s.strip()]
    if set(wanted) - set(SCENARIOS):
        p.error(f"unknown scenarios {sorted(set(wanted) - set(SCENARIOS))}")
    if not shutil.which("wrk"):
        raise SystemExit("wrk is required: apt-get install -y wrk")
    core.RESULTS.mkdir(parents=True, exist_ok=True)
    load1 = os.getloadavg()[0]
    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    prefix = f"bench-{uuid.uuid4().hex[:6]}"
    db_name = f"creditgate_bench_{uuid.uuid4().hex[:8]}"
    db_url, keys = asyncio.run(core.prepare_database(opts.admin_database_url, db_name,
                                                     opts.accounts))
    rounds: list[dict[str, core.Result]] = []
    try:
        with core.redis_server(opts.redis_url) as redis_url:
            core.prepare_redis(redis_url)
            rounds = run_all(opts, wanted, db_url, redis_url, keys, prefix)
    finally:
        if not opts.keep_db:
            asyncio.run(core.drop_database(opts.admin_database_url, db_name))
    results = core.combine(rounds)
    rat = ratios(results)
    meta = {"started_at": started, "cpus": os.cpu_count(), "duration_s": opts.duration,
            "load_avg_before": round(load1, 2), "load_avg_after": round(os.getloadavg()[0], 2),
            "git": core.git_rev(), "accounts": opts.accounts, "concurrency": opts.concurrency,
            "batch_concurrency": opts.batch_concurrency, "batch_size": opts.batch_size,
            "rounds": opts.rounds, "workers": opts.workers, "round_ratios": [ratios(r) for r in rounds]}
    out = {"meta": meta, "results": {k: asdict(v) for k, v in results.items()}, "ratios": rat,
           "target": TARGET}
    (core.RESULTS / "measurements.json").write_text(json.dumps(out, indent=2) + "\n")
    print()
    print(markdown(results, rat, meta))


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def ratios(results: dict[str, core.Result]) -> dict[str, float | None]:
    return {"measure_over_usage": _ratio(events(results.get("measure")),
                                         events(results.get("usage"))),
            "measure_batch_over_batch": _ratio(events(results.get("measure_batch")),
                                               events(results.get("batch")))}


def run_all(opts: argparse.Namespace, wanted: list[str], db_url: str, redis_url: str,
            keys: dict[str, str], prefix: str) -> list[dict[str, core.Result]]:
    """Every wanted scenario, `--rounds` times over (one server, one set of accounts); the
    results of each round."""
    now = datetime.now(UTC)
    ts = now.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    start = now.date().replace(day=1).isoformat()
    rounds: list[dict[str, core.Result]] = []
    port = core.free_port()
    env = {"DATABASE_URL": db_url, "REDIS_URL": redis_url}
    token = keys["runtime"]
    with core.server("creditgate", core.granian_cmd("app.main:create_app_from_env", port, True),
                     env, ("GET", "/healthz", None), port, opts.pin_server) as (base, proc):
        core.create_catalog(base, keys["admin"], prefix, opts.accounts)
        meter = create_rating(base, keys["admin"], prefix, opts.accounts, start)
        for round_no in range(opts.rounds):
            if opts.rounds > 1:
                print(f"round {round_no + 1} of {opts.rounds}", flush=True)
            rounds.append(run_round(opts, wanted, db_url, base, proc, token, meter, prefix,
                                    f"{prefix}r{round_no}", ts))
    return rounds


def run_round(opts: argparse.Namespace, wanted: list[str], db_url: str, base: str,
              proc: subprocess.Popen[bytes], token: str, meter: str, prefix: str, uids: str,
              ts: str) -> dict[str, core.Result]:
    """One pass over the scenarios: the accounts are `prefix`'s, the uids begin with `uids`."""
    n = str(opts.accounts)
    results: dict[str, core.Result] = {}
    plans: dict[str, tuple[str, str, Any, int]] = {
        "usage": ("POST /v1/usage, 1 event", "usage.lua",
                  lambda run: [n, prefix, token, f"{uids}-u{run}", ts], 1),
        "measure": ("POST /v1/measurements, 1 measurement", "measure.lua",
                    lambda run: [n, prefix, token, f"{uids}-m{run}", ts, meter, "1"], 1),
        "batch": (f"POST /v1/usage, {opts.batch_size:,} events", "batch.lua",
                  lambda run: [n, prefix, token, f"{uids}-b{run}", ts,
                               str(opts.batch_size)], opts.batch_size),
        "measure_batch": (f"POST /v1/measurements, {opts.batch_size:,} measurements",
                          "measure.lua",
                          lambda run: [n, prefix, token, f"{uids}-mb{run}", ts, meter,
                                       str(opts.batch_size)], opts.batch_size),
    }
    for name in [s for s in SCENARIOS if s in wanted]:
        what, script, args_for, size = plans[name]
        batched = size > 1
        usage_before = asyncio.run(count(db_url, "usage_events"))
        measured_before = asyncio.run(count(db_url, "measurements"))
        debits_before = asyncio.run(count(db_url, "rated_debits"))
        spy = None
        if name in opts.profile.split(","):
            out = core.RESULTS / f"profile-{name}.txt"
            spy = subprocess.Popen(
                [str(core.VENV_BIN / "py-spy"), "record", "--pid", str(proc.pid),
                 "--subprocesses", "--nonblocking", "--rate", "250", "--format", "raw",
                 "--output", str(out), "--duration", str(opts.duration + opts.warmup + 2)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            res = core.measure(name, what, "granian", base, script, args_for, opts,
                               server_pid=proc.pid,
                               connections=opts.batch_concurrency if batched else None,
                               events_per_request=size if batched else None,
                               timeout_s=60 if batched else 10)
        finally:
            if spy is not None:
                spy.wait()
                print(f"    py-spy: bench/profile_top.py {out} --app")
        used = asyncio.run(settle(db_url, "usage_events", usage_before))
        if name.startswith("measure"):
            check_rated(res, asyncio.run(settle(db_url, "measurements", measured_before)),
                        asyncio.run(count(db_url, "rated_debits")) - debits_before, used, size)
        else:
            core.check_committed(res, used, size)
        results[name] = res
    return results


if __name__ == "__main__":
    main()
