"""What the benches that time one pass two ways share (recurring.py, unsent.py, rerate.py,
rebuild.py, marks.py, rollups.py): a database of their own beside a private redis-server,
rounds that run each way in turn (wall time and a CPU clock), and the table they print."""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import date, timedelta
from typing import Any

import asyncpg
import run as core  # bench/run.py: databases, the private redis-server, CPU counters

Totals = dict[str, list[float]]  # per way: [wall ms, CPU ms] over every round
# the bench's own work: (options, database url, redis url, API keys) -> totals
Body = Callable[[argparse.Namespace, str, str, dict[str, str]], Awaitable[Totals]]


async def one_account(conn: asyncpg.Connection, effective: timedelta = timedelta(0)) -> None:
    """The catalog of the rebuild benches (rebuild.py, marks.py, balance_at.py), written
    straight to Postgres: credit type 1 `usd`, product `api`, account 1 `big` (its own root)
    and its balance 1, a grant of 100,000,000 made and effective `effective` ago."""
    await conn.execute(
        """INSERT INTO credit_types (id, code, name, kind, decimal_places)
               VALUES (1, 'usd', 'US dollar', 'fiat', 2);
           INSERT INTO products (code, name) VALUES ('api', 'API');
           INSERT INTO accounts (id, code, name, root_id, credit_type_id)
               VALUES (1, 'big', 'Big', 1, 1)""")
    await conn.execute(
        """INSERT INTO balances (id, account_id, credit_type_id, priority, effective_at,
                                 description, source, status)
               VALUES (1, 1, 1, 100, now() - $1::interval, 'long-lived', 'grant', 'active')""",
        effective)
    await conn.execute(
        """INSERT INTO ledger_entries (op_key, seq, account_id, balance_id, credit_type_id,
                                       kind, amount, created_at)
               VALUES ('g:1', 0, 1, 1, 1, 'grant', 100000000, now() - $1::interval)""",
        effective)


def postgres_cpu() -> float:
    """CPU seconds of every postgres process on the machine."""
    return sum(core.cpu_of(core.named("postgres")).values())


def app_cpu() -> float:
    """CPU seconds of this process (the app runs in it)."""
    return time.process_time()


async def timed_rounds(rounds: int, ways: tuple[str, str], one: Callable[[str], Awaitable[int]],
                       cpu: Callable[[], float], cpu_name: str) -> Totals:
    """Run `one(way)` for each way in turn, `rounds` times; each must find nothing to do (it
    returns how much it did)."""
    totals: Totals = {way: [0.0, 0.0] for way in ways}
    for n in range(rounds):
        for way in ways:
            wall, used = time.perf_counter(), cpu()
            did = await one(way)
            wall, used = time.perf_counter() - wall, cpu() - used
            if did:
                raise SystemExit(f"{way}: did {did}; there was nothing to do")
            totals[way][0] += wall * 1000
            totals[way][1] += used * 1000
            print(f"round {n + 1} {way:16}  {wall * 1000:9.1f} ms wall  "
                  f"{used * 1000:7.1f} ms {cpu_name}")
    return totals


def table(title: str, cpu_name: str, rows: list[tuple[str, str]], totals: Totals,
          rounds: int) -> None:
    """The markdown table of the two ways (label, way), then the ratio of the first to the
    second. A CPU figure below the counters' 10 ms tick is said to be."""
    print(f"\n{title}; {rounds} rounds, per pass:")
    print(f"| pass | wall ms | {cpu_name} ms |\n|---|---:|---:|")
    for label, way in rows:
        wall, used = (t / rounds for t in totals[way])
        print(f"| {label} | {wall:.2f} | {f'{used:.2f}' if used else '< 10 (below the tick)'} |")
    (_, first), (_, second) = rows
    (w1, c1), (w2, c2) = totals[first], totals[second]
    cpu = _times(c1 / c2) if c2 else "the second is below the counters' tick"
    print(f"ratio {first} / {second}: wall {_times(w1 / w2)}; {cpu_name}: {cpu}")


def _times(ratio: float) -> str:  # float-ok: a ratio of timings, printed
    return f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.2f}x"


def main(doc: str, options: Callable[[argparse.ArgumentParser], None], body: Body,
         report: Callable[[argparse.Namespace, Totals], None], rounds: int = 3) -> None:
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    options(p)
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--admin-database-url", default=os.environ.get(
        "BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"))
    opts = p.parse_args()
    with core.redis_server("private") as redis_url:
        totals = asyncio.run(_on_database(opts, redis_url.split("?")[0], body))
    report(opts, totals)


async def _on_database(opts: argparse.Namespace, redis_url: str, body: Body) -> Totals:
    name = f"creditgate_bench_{uuid.uuid4().hex[:8]}"
    url, keys = await core.prepare_database(opts.admin_database_url, name, 1)
    try:
        return await body(opts, url, redis_url, keys)
    finally:
        await core.drop_database(opts.admin_database_url, name)


async def post_all(client: Any, calls: list[tuple[str, dict[str, Any]]]) -> None:
    """Create the catalog over the admin API: each POST must answer 201."""
    for path, body in calls:
        r = await client.post(path, json=body)
        if r.status_code != 201:
            raise RuntimeError(f"POST {path}: {r.status_code} {r.text}")


async def accounts_on_the_plan(url: str, accounts: int, start: date) -> None:
    """`accounts` accounts (`acct-1`, …) in the one credit type, each attached to the one plan
    from `start`, written in bulk."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            """INSERT INTO accounts (id, code, name, root_id, credit_type_id)
               SELECT n, 'acct-' || n, 'acct-' || n, n, (SELECT id FROM credit_types)
               FROM generate_series(1, $1) AS n""", accounts)
        await conn.execute("SELECT setval('accounts_id_seq', $1)", accounts)
        await conn.execute(
            """INSERT INTO account_plans (account_id, plan_id, start_date, billing_anchor)
               SELECT n, (SELECT id FROM plans), $2::date, $2::date
               FROM generate_series(1, $1) AS n""",
            accounts, start)
    finally:
        await conn.close()
