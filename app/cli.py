"""The `creditgate` command: serve, migrate, keys create/list/revoke, tokens
rotate-secret/secrets, webhooks send-test/watch, journal stuck/drop, hotstate verify.

With DATABASE_URL unset (and REDIS_URL, for `serve`), the commands use embedded Postgres and
Redis kept in the data folder (--data-dir, env CREDITGATE_DATA_DIR, default ./.data); see
app/embedded.py. `migrate` and `keys create` reuse the servers of a `serve` running on the same
folder instead of starting their own.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TypeVar

import asyncpg

from app.auth.keys import (
    KEY_SCOPES,
    Scope,
    count_api_keys,
    create_api_key,
    list_api_keys,
    revoke_api_key,
)
from app.auth.tokens import list_secrets, rotate_secret
from app.db import migrate, pending_migrations
from app.embedded import DataDirBusy, default_data_dir, running_embedded, start_embedded
from app.settings import Settings, migrations_dir

T = TypeVar("T")
APP_FACTORY = "app.main:create_app_from_env"
# Serialises "create the first admin key" between processes starting at the same time.
BOOTSTRAP_LOCK_ID = 0x63726B79  # "crky"


class CliError(Exception):
    """A problem worth one line on stderr, not a traceback."""


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except CliError as exc:
        _note(f"creditgate: error: {exc}")
        return 1
    except DataDirBusy as exc:
        _note(f"creditgate: error: {exc} (a running `creditgate serve`? use another --data-dir)")
        return 1
    except KeyboardInterrupt:
        return 130
    return code


def build_parser() -> argparse.ArgumentParser:
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument(
        "--data-dir", type=Path, default=default_data_dir(),
        help="folder of the embedded Postgres and Redis, used when DATABASE_URL is unset "
        "(env CREDITGATE_DATA_DIR, default ./.data)",
    )
    parser = argparse.ArgumentParser(prog="creditgate", description="Prepaid-credit gateway.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", parents=[data], help="migrate, then serve the HTTP API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=_positive_int, default=1, help="worker processes")
    serve.set_defaults(run=_cmd_serve)

    mig = commands.add_parser("migrate", parents=[data], help="apply pending migrations")
    mig.set_defaults(run=_cmd_migrate)

    key_commands = _group(commands, "keys", "manage API keys")
    create = key_commands.add_parser("create", parents=[data], help="create an API key")
    create.add_argument("--scope", required=True, choices=[s.value for s in KEY_SCOPES])
    create.add_argument("--name", default="")
    create.set_defaults(run=_cmd_keys_create)
    listing = key_commands.add_parser("list", parents=[data],
                                      help="list the API keys (prefix, scope, name, revoked)")
    listing.set_defaults(run=_cmd_keys_list)
    revoke = key_commands.add_parser(
        "revoke", parents=[data],
        help="revoke an API key and the customer tokens it minted (within 30 s everywhere)")
    revoke.add_argument("id", type=int, help="the key's id, from `keys list`")
    revoke.set_defaults(run=_cmd_keys_revoke)

    token_commands = _group(commands, "tokens", "customer tokens: rotate the signing secret")
    rotate = token_commands.add_parser(
        "rotate-secret", parents=[data],
        help="write a new signing secret for customer tokens; the older ones keep verifying "
        "until every token they signed has expired (about 24 h), unless --retire-now")
    rotate.add_argument(
        "--retire-now", action="store_true",
        help="the older secrets stop verifying at once (a leaked secret): every customer token "
        "minted before is refused in every process within CREDITGATE_TOKEN_SECRETS_TTL_S")
    rotate.set_defaults(run=_cmd_tokens_rotate_secret)
    secrets_list = token_commands.add_parser(
        "secrets", parents=[data],
        help="list the signing secrets (id, created, retired; never the secret)")
    secrets_list.set_defaults(run=_cmd_tokens_secrets)

    hook_commands = _group(commands, "webhooks",
                           "outbound webhooks: send a test, watch deliveries")
    test = hook_commands.add_parser("send-test", parents=[data],
                                    help="send a webhook.test event to one endpoint only")
    test.add_argument("endpoint_id", type=_positive_int)
    test.set_defaults(run=_cmd_webhooks_send_test)
    watch = hook_commands.add_parser("watch", parents=[data],
                                     help="print deliveries and attempts as they happen")
    watch.add_argument("--endpoint", type=_positive_int, default=None, help="only this endpoint id")
    watch.add_argument("--interval", type=float, default=0.5, help="seconds between polls")
    watch.set_defaults(run=_cmd_webhooks_watch)
    journal_commands = _group(commands, "journal",
                              "journal entries Postgres will not take: list them, drop one")
    stuck = journal_commands.add_parser(
        "stuck", parents=[data],
        help="commit what the journals hold that can be committed, and name each entry "
        "Postgres refuses, with its error (exit status 3 when there is one)")
    stuck.add_argument("--older-than", type=_positive_int, default=60, metavar="SECONDS",
                       help="only entries decided at least this long ago (default 60)")
    stuck.set_defaults(run=_cmd_journal_stuck)
    drop = journal_commands.add_parser(
        "drop", parents=[data],
        help="take one entry Postgres refuses out of its journal (never answered with a "
        "2xx) and rebuild its root from Postgres")
    drop.add_argument("root_id", type=_positive_int, help="the root id, from `journal stuck`")
    drop.add_argument("entry_id", type=_stream_id, help="the entry id, from `journal stuck`")
    drop.set_defaults(run=_cmd_journal_drop)

    hot_commands = _group(commands, "hotstate", "the Redis hot copy: compare it with Postgres")
    verify = hot_commands.add_parser(
        "verify", parents=[data],
        help="compare each loaded root's hot copy with what a rebuild from Postgres would "
        "install now; print what differs (exit status 3 when something does)")
    verify.add_argument("--account", default=None, help="only the root of this account code")
    verify.add_argument("--repair", action="store_true",
                        help="drop the roots that differ from Redis: the next request rebuilds "
                        "them from Postgres")
    verify.set_defaults(run=_cmd_hotstate_verify)
    return parser


def _group(commands: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
           help_text: str) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """A command with subcommands of its own (`creditgate <name> <subcommand>`)."""
    return commands.add_parser(name, help=help_text).add_subparsers(
        dest=f"{name}_command", required=True, metavar="COMMAND")


def _stream_id(raw: str) -> str:
    if not re.fullmatch(r"[0-9]{1,20}-[0-9]{1,20}", raw):
        raise argparse.ArgumentTypeError("a journal entry id is <ms>-<n>, e.g. 1764842400000-0")
    return raw


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


# --- commands ------------------------------------------------------------------------------


def _cmd_serve(args: argparse.Namespace) -> int:
    _exit_on_sigterm()  # until granian installs its own handlers, so cleanup still runs
    with _backing_services(args.data_dir, need_redis=True, serving=True):
        settings = Settings.from_env()
        admin_key = asyncio.run(_prepare(settings))
        _print_banner(args.host, args.port, admin_key)
        _run_granian(args.host, args.port, args.workers)
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    with _backing_services(args.data_dir, need_redis=False):
        applied = asyncio.run(migrate(os.environ["DATABASE_URL"], migrations_dir()))
    for name in applied:
        print(f"applied {name}")
    if not applied:
        print("up to date")
    return 0


def _cmd_keys_create(args: argparse.Namespace) -> int:
    with _backing_services(args.data_dir, need_redis=False):
        key = asyncio.run(_create_key(os.environ["DATABASE_URL"], Scope(args.scope), args.name))
    print(key)
    _note(f"created an API key with scope {args.scope}; it is shown only this once")
    return 0


def _cmd_keys_list(args: argparse.Namespace) -> int:
    with _backing_services(args.data_dir, need_redis=False):
        rows = asyncio.run(_with_conn(os.environ["DATABASE_URL"], list_api_keys))
    print(f"{'id':>6}  {'prefix':<13} {'scope':<8} {'created':<20} {'revoked':<20} name")
    for row in rows:
        revoked = f"{row['revoked_at']:%Y-%m-%d %H:%M:%S}" if row["revoked_at"] else "-"
        print(f"{row['id']:>6}  {row['prefix'] + '…':<13} {row['scope']:<8} "
              f"{row['created_at']:%Y-%m-%d %H:%M:%S}  {revoked:<20} {row['name']}")
    return 0


def _cmd_keys_revoke(args: argparse.Namespace) -> int:
    with _backing_services(args.data_dir, need_redis=False):
        done = asyncio.run(_with_conn(os.environ["DATABASE_URL"],
                                      lambda conn: revoke_api_key(conn, args.id)))
    if not done:
        raise CliError(f"no live API key with id {args.id}")
    _note(f"revoked API key {args.id}; processes stop taking it (and its customer tokens) "
          "within 30 s")
    return 0


def _cmd_tokens_rotate_secret(args: argparse.Namespace) -> int:
    with _backing_services(args.data_dir, need_redis=False):
        new_id = asyncio.run(_migrated_conn(
            os.environ["DATABASE_URL"],
            lambda conn: rotate_secret(conn, retire_now=args.retire_now)))
    print(new_id)
    if args.retire_now:
        _note(f"customer-token secret {new_id} signs new tokens; every older secret is retired "
              "now: the tokens they signed are refused in every process within "
              "CREDITGATE_TOKEN_SECRETS_TTL_S (30 s by default)")
    else:
        _note(f"customer-token secret {new_id} signs new tokens (every process within "
              "CREDITGATE_TOKEN_SECRETS_TTL_S); the older secrets verify the tokens they signed "
              "until these expire (retired at the time `tokens secrets` shows)")
    return 0


def _cmd_tokens_secrets(args: argparse.Namespace) -> int:
    with _backing_services(args.data_dir, need_redis=False):
        rows = asyncio.run(_with_conn(os.environ["DATABASE_URL"], list_secrets))
    newest_live = max((r.id for r in rows if r.retired_at is None), default=None)
    now = datetime.now(UTC)
    print(f"{'id':>6}  {'created (UTC)':<20} {'retired (UTC)':<20} state")
    for row in rows:
        retired = f"{row.retired_at.astimezone(UTC):%Y-%m-%d %H:%M:%S}" if row.retired_at \
            else "-"
        state = ("signing" if row.id == newest_live else "verifying") \
            if row.retired_at is None else "retiring" if row.retired_at > now else "retired"
        print(f"{row.id:>6}  {row.created_at.astimezone(UTC):%Y-%m-%d %H:%M:%S}  "
              f"{retired:<20} {state}")
    return 0


async def _migrated_conn(dsn: str, action: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """`action` on a connection to a database whose migrations are all applied."""
    async def checked(conn: asyncpg.Connection) -> T:
        pending = await pending_migrations(conn, migrations_dir())
        if pending:
            raise CliError(f"pending migrations ({', '.join(pending)}): run `creditgate migrate`")
        return await action(conn)

    return await _with_conn(dsn, checked)


async def _with_conn(dsn: str, action: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    conn = await asyncpg.connect(dsn)
    try:
        return await action(conn)
    finally:
        await conn.close()


def _cmd_webhooks_send_test(args: argparse.Namespace) -> int:
    from app.errors import Problem
    from app.webhooks.commands import send_test

    with _backing_services(args.data_dir, need_redis=False):
        try:
            print(asyncio.run(send_test(os.environ["DATABASE_URL"], args.endpoint_id)))
        except Problem as exc:
            raise CliError(exc.detail) from exc
    return 0


def _cmd_webhooks_watch(args: argparse.Namespace) -> int:
    from app.webhooks.commands import watch

    with _backing_services(args.data_dir, need_redis=False):
        asyncio.run(watch(os.environ["DATABASE_URL"], args.endpoint, args.interval,
                          lambda line: print(line, flush=True)))
    return 0


def _cmd_journal_stuck(args: argparse.Namespace) -> int:
    from app.ledger.commands import stuck

    with _backing_services(args.data_dir, need_redis=True):
        found = asyncio.run(stuck(Settings.from_env(), args.older_than * 1000,
                                  lambda line: print(line, flush=True)))
    return 3 if found else 0


def _cmd_journal_drop(args: argparse.Namespace) -> int:
    from app.ledger.commands import drop

    with _backing_services(args.data_dir, need_redis=True):
        try:
            print(asyncio.run(drop(Settings.from_env(), args.root_id, args.entry_id)))
        except LookupError as exc:
            raise CliError(str(exc)) from exc
    return 0


def _cmd_hotstate_verify(args: argparse.Namespace) -> int:
    from app.ledger.commands import verify

    with _backing_services(args.data_dir, need_redis=True):
        try:
            drifting = asyncio.run(verify(Settings.from_env(), args.account, args.repair,
                                          lambda line: print(line, flush=True)))
        except LookupError as exc:
            raise CliError(str(exc)) from exc
    return 3 if drifting else 0


# --- backing services ----------------------------------------------------------------------


@contextmanager
def _backing_services(data_dir: Path, *, need_redis: bool,
                      serving: bool = False) -> Iterator[None]:
    """Point DATABASE_URL (and REDIS_URL) at running servers for the duration of the block.

    External servers when the variables are set; otherwise the embedded servers of `data_dir`:
    those of another process when one runs them (not when `serving`), else our own.
    """
    database_url = os.environ.get("DATABASE_URL", "")
    redis_url = os.environ.get("REDIS_URL", "")
    if database_url and (redis_url or not need_redis):
        yield
        return
    if need_redis and (database_url or redis_url):
        raise CliError("set both DATABASE_URL and REDIS_URL, or neither (embedded mode)")
    shared = None if serving else running_embedded(data_dir)
    if shared is not None:
        _set_urls(shared.database_url, shared.redis_url)
        yield
        return
    _note(f"starting embedded Postgres and Redis in {data_dir.resolve()}")
    servers = start_embedded(data_dir)
    try:
        _set_urls(servers.database_url, servers.redis_url)
        yield
    finally:
        _note("stopping embedded Postgres and Redis")
        servers.stop()


def _set_urls(database_url: str, redis_url: str) -> None:
    # Exported so that server worker processes, which build their own Settings, inherit them.
    os.environ["DATABASE_URL"] = database_url
    os.environ["REDIS_URL"] = redis_url


def _exit_on_sigterm() -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


# --- database steps ------------------------------------------------------------------------


async def _prepare(settings: Settings) -> str | None:
    """Apply migrations; on first start, create and return an admin key."""
    for name in await migrate(settings.database_url, settings.migrations_dir):
        _note(f"applied migration {name}")
    return await _bootstrap_admin_key(settings.database_url)


async def _bootstrap_admin_key(dsn: str) -> str | None:
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", BOOTSTRAP_LOCK_ID)
            if await count_api_keys(conn) > 0:
                return None
            return await create_api_key(conn, Scope.admin, "bootstrap admin")
    finally:
        await conn.close()


async def _create_key(dsn: str, scope: Scope, name: str) -> str:
    return await _migrated_conn(dsn, lambda conn: create_api_key(conn, scope, name))


# --- serving -------------------------------------------------------------------------------


def _base_url(host: str, port: int) -> str:
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def _print_banner(host: str, port: int, admin_key: str | None) -> None:
    lines = ["", f"creditgate: serving on {_base_url(host, port)}"]
    if admin_key is not None:
        lines += [
            "",
            "  First start: created an admin API key. It is shown only this once; store it now:",
            "",
            f"      {admin_key}",
            "",
            "  Send it as `Authorization: Bearer <key>`.",
        ]
    print("\n".join([*lines, ""]), flush=True)


def _run_granian(host: str, port: int, workers: int) -> None:
    from granian import Granian
    from granian.constants import Interfaces

    server = Granian(
        APP_FACTORY,
        address=host,
        port=port,
        interface=Interfaces.ASGI,
        workers=workers,
        factory=True,
        log_access=False,
    )
    server.serve()


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
