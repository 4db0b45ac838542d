"""Real app processes for multi-process tests: granian serving `app.main:create_app_from_env`.

Each process runs in a session (process group) of its own, so `kill()` takes the granian
supervisor and its forked worker down together, the way `kill -9` of a host would. `run_apps`
always reaps every process it started, even when the test fails or is cancelled.

By default the processes get a Redis key prefix of their own (derived from the test
settings' prefix): they share Postgres and Redis with the test session, but only they (not the
in-process app of other tests) touch their hot state and sweep their journal.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from app.settings import REPO_ROOT, Settings

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
_RUNNING: set[AppProcess] = set()


@atexit.register
def _reap_leftovers() -> None:
    """Last resort (e.g. the test run is interrupted): no app process outlives pytest."""
    for app in list(_RUNNING):
        app.stop()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(eq=False)
class AppProcess:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    killed: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 4_000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)  # the process leads its own group (start_new_session)

    def kill(self) -> None:
        """`kill -9` of the whole process group (supervisor and worker), then reap it."""
        self.killed = True
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=STOP_TIMEOUT_S)

    def stop(self) -> None:
        """Graceful stop (SIGTERM), SIGKILL after STOP_TIMEOUT_S; stray group members too."""
        if self.alive:
            self.signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        # the worker may outlive the supervisor: always sweep the group
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        _RUNNING.discard(self)

    def client(self, **kwargs: object) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        return httpx.AsyncClient(base_url=self.url, timeout=30.0, limits=limits,
                                 **kwargs)  # type: ignore[arg-type]


@dataclass
class AppProcesses:
    settings: Settings
    prefix: str
    env: dict[str, str]
    log_dir: Path
    procs: list[AppProcess] = field(default_factory=list)

    def __getitem__(self, index: int) -> AppProcess:
        return self.procs[index]

    def __iter__(self) -> Iterator[AppProcess]:
        return iter(self.procs)

    def __len__(self) -> int:
        return len(self.procs)

    def _spawn(self, name: str) -> AppProcess:
        port = free_port()
        env = {**os.environ, "DATABASE_URL": self.settings.database_url,
               "REDIS_URL": self.settings.redis_url, "CREDITGATE_WORKERS": "1",
               "CREDITGATE_REDIS_PREFIX": self.prefix,
               "CREDITGATE_MIGRATIONS_DIR": str(self.settings.migrations_dir),
               "PYTHONUNBUFFERED": "1", **self.env}
        log_path = self.log_dir / f"{name}-{port}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "granian", "--interface", "asgi", "--factory",
                 "app.main:create_app_from_env", "--host", "127.0.0.1", "--port", str(port),
                 "--workers", "1", "--no-access-log", "--log-level", "warning"],
                cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        app = AppProcess(name, port, proc, log_path)
        self.procs.append(app)
        _RUNNING.add(app)
        return app

    async def _wait_healthy(self, app: AppProcess) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        async with httpx.AsyncClient(base_url=app.url, timeout=1.0) as client:
            while time.monotonic() < deadline:
                if not app.alive:
                    return False
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get("/healthz")).status_code == 200:
                        return True
                await asyncio.sleep(0.1)
        return False

    async def start(self, name: str | None = None) -> AppProcess:
        """Start one more process and wait until it answers /healthz (retries a port clash)."""
        name = name or f"app{len(self.procs)}"
        for _ in range(3):
            app = self._spawn(name)
            if await self._wait_healthy(app):
                return app
            tail = app.log_tail()
            app.stop()
            self.procs.remove(app)
            if "address already in use" not in tail.lower():
                raise RuntimeError(f"{name} did not become healthy; its log:\n{tail}")
        raise RuntimeError(f"{name}: no free port after 3 tries")

    def stop_all(self) -> None:
        for app in self.procs:
            app.stop()

    def tracebacks(self) -> str:
        """The logs of the processes that logged an unhandled error or a failed worker pass."""
        return "\n".join(f"--- {a.name} ---\n{a.log_tail()}" for a in self.procs
                         if "Traceback" in a.log_tail(1_000_000))

    def logs(self) -> str:
        return "\n".join(f"--- {a.name} ({a.url}) ---\n{a.log_tail()}" for a in self.procs)


@contextlib.asynccontextmanager
async def run_apps(settings: Settings, n: int = 2, *, env: dict[str, str] | None = None,
                   prefix: str | None = None) -> AsyncIterator[AppProcesses]:
    """Start n app processes (in parallel); stop and reap all of them on the way out."""
    log_dir = Path(tempfile.mkdtemp(prefix="creditgate-procs-"))
    apps = AppProcesses(settings, prefix or f"{settings.redis_prefix}p{uuid.uuid4().hex[:6]}",
                        {"CREDITGATE_JOURNAL_ORPHAN_MS": str(settings.journal_orphan_ms),
                         "CREDITGATE_WORKER_INTERVAL_S": str(settings.worker_interval_s),
                         "CREDITGATE_BILLS_AUTO": "1" if settings.bills_auto else "0",
                         "CREDITGATE_SNAPSHOT_EVERY": str(settings.snapshot_every),
                         "CREDITGATE_VERIFY_EVERY_S": str(settings.verify_every_s),
                         **(env or {})}, log_dir)
    failed = True
    try:
        started = await asyncio.gather(*(apps.start(f"app{i}") for i in range(n)),
                                       return_exceptions=True)
        for outcome in started:
            if isinstance(outcome, BaseException):
                raise outcome
        yield apps
        failed = False
    finally:
        # synchronous on purpose: runs even when the test's task is being cancelled
        apps.stop_all()
        if failed:  # pytest shows captured output of a failed test: the processes' logs
            print(f"app process logs (kept in {log_dir}):\n{apps.logs()}", file=sys.stderr)
        else:
            shutil.rmtree(log_dir, ignore_errors=True)


# --- Postgres-side truth, for comparing with what the API and the hot state say ------------


async def rows_once(db: asyncpg.Connection, count: int, query: str,
                    *args: Any) -> list[asyncpg.Record]:
    """The query's rows once there are at least `count` (or after 5 s): for rows a write
    commits right behind its answer (a journal group commit, a later announcement)."""
    for _ in range(100):
        rows: list[asyncpg.Record] = await db.fetch(query, *args)
        if len(rows) >= count:
            break
        await asyncio.sleep(0.05)
    return rows


async def account_id(db: asyncpg.Connection, code: str) -> int:
    found = await db.fetchval("SELECT id FROM accounts WHERE code = $1", code)
    assert found is not None, code
    return int(found)


async def balance_sum(db: asyncpg.Connection, balance_id: int) -> Decimal:
    """What remains of a balance: the sum of its ledger entries."""
    return Decimal(await db.fetchval(
        "SELECT COALESCE(sum(amount), 0) FROM ledger_entries WHERE balance_id = $1", balance_id))


async def kind_sum(db: asyncpg.Connection, account_ids: list[int], kind: str) -> Decimal:
    return Decimal(await db.fetchval(
        "SELECT COALESCE(sum(amount), 0) FROM ledger_entries "
        "WHERE account_id = ANY($1::int8[]) AND kind = $2", account_ids, kind))


async def entries_by_uid(db: asyncpg.Connection, uids: list[str]) -> dict[str, tuple[int, Decimal]]:
    """Per usage uid: how many operations wrote entries for it, and the sum of those entries."""
    rows = await db.fetch(
        "SELECT usage_uid, count(DISTINCT op_key) AS ops, sum(amount) AS total "
        "FROM ledger_entries WHERE usage_uid = ANY($1::text[]) GROUP BY usage_uid", uids)
    return {r["usage_uid"]: (int(r["ops"]), Decimal(r["total"])) for r in rows}


async def usage_rows(db: asyncpg.Connection, account_ids: list[int]) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT account_id, uid, amount, overage FROM usage_events "
        "WHERE account_id = ANY($1::int8[])", account_ids)


def live_total(view: dict[str, Any]) -> tuple[Decimal, Decimal]:
    """(available, overage) of the only credit type of a real-time balance view."""
    [total] = view["totals"]
    return Decimal(total["available"]), Decimal(total["overage"])


def live_remaining(view: dict[str, Any]) -> dict[int, Decimal]:
    return {b["id"]: Decimal(b["remaining"]) for b in view["balances"]}


async def call_as(client: httpx.AsyncClient, key: str, method: str, path: str,
                  **kwargs: Any) -> Any:
    """One request to an app process with an API key; a non-2xx answer fails the test."""
    response = await client.request(method, path, headers={"Authorization": f"Bearer {key}"},
                                     **kwargs)
    assert response.status_code < 300, response.text
    return response.json()


async def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """`creditgate <args>` run to its end in a process of its own, on the test session's
    database, Redis and hot state (its key prefix)."""
    env = {**os.environ, "DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url,
           "CREDITGATE_REDIS_PREFIX": settings.redis_prefix,
           "CREDITGATE_MIGRATIONS_DIR": str(settings.migrations_dir)}
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", "from app.cli import main; raise SystemExit(main())",
                         *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=60)
