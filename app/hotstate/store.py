"""The hot copy in Redis: Lua scripts loaded once from files and called by SHA."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from app.hotstate.checkcache import CheckCache
from app.hotstate.keys import Keys
from app.hotstate.resp import FastRedis, Script

LUA_DIR = Path(__file__).parent / "lua"
SCRIPTS = ("decide", "ledger_op", "account", "snapshot", "install", "ack", "read", "watch",
           "sweep", "dump")
# Hot path numbers are passed to Lua as strings; the bucket of a usage uid is its UTC day.
# Threshold watches (lib.lua check_watches), by name: `balance.low` and auto-recharge.
LOW_WATCH = "low"
RECHARGE_WATCH = "recharge"

# Usage uids are remembered per UTC day of recording, for today and yesterday; older replays
# are checked against Postgres (entitlements.service) and rebuilt marks come from it (loader).
DAY_MS = 86_400_000
MARK_TTL_S = 2 * 86_400 + 3_600


# The journal index (keys.py `journal_index`): a process announces a root there before it
# journals for it, again once the announcement is older than INDEX_EVERY_S, and before it
# installs a rebuilt root. So every journal entry was written at most INDEX_EVERY_S (plus the
# time a command can wait in a connection: INDEX_SLACK_MS, the stall limit of resp.py) after
# its root's latest announcement, and the orphan sweep needs to read only roots announced in the
# last orphan age + INDEX_EVERY_S + INDEX_SLACK_MS. Constants, not settings: every process and
# every sweep must use the same ones.
INDEX_EVERY_S = 1.0
INDEX_SLACK_MS = 5_000
INDEX_MEMORY = 100_000  # announcements remembered per process before the stale ones are pruned


def index_lag_ms(orphan_ms: int) -> int:
    """How long after its latest announcement a root's journal holds only orphan-age entries."""
    return orphan_ms + int(INDEX_EVERY_S * 1000) + INDEX_SLACK_MS


def mark_window_start(now_ms: int) -> int:
    """The first instant (ms) whose usage uids Redis still remembers: yesterday 00:00 UTC."""
    return (now_ms // DAY_MS - 1) * DAY_MS


@dataclass(slots=True)  # built for every event: no frozen __setattr__ cost
class DecideArgs:
    account_id: int
    chain: str  # "self,parent,...,root"
    uid: str
    product: str
    credit_type: str
    amount: int
    at_ms: int
    mode: str  # q: check, c: consume if allowed, u: usage
    payload: str

    def argv(self) -> list[str | int]:
        return [self.account_id, self.chain, self.uid, self.product, self.credit_type,
                self.amount, self.at_ms, self.mode, self.payload]


@dataclass(slots=True)  # built for every event: no frozen __setattr__ cost
class Decision:
    status: str
    available: int
    overage: int
    allocations: str
    stream_id: str
    gen: str
    flag_change: str
    crossings: str
    changes_at: int = 0  # a check: when time alone may change its answer (0: never)


@dataclass(frozen=True)
class LedgerOpArgs:
    kind: str
    account_id: int
    chain: str
    balance_id: int
    amount: int
    definition: str
    at_ms: int
    payload: str


@dataclass(frozen=True)
class LedgerOpResult:
    status: str  # ok | cold | missing | insufficient
    applied: int = 0
    remaining: int = 0
    stream_id: str = ""
    gen: str = ""
    flag_changes: str = ""
    crossings: str = ""
    owed: int = 0


@dataclass
class Dump:
    """dump.lua's answer: per account id, its hashes by kind (a: status and parent, b:
    remaining amounts, d: balance definitions, o: overage)."""

    loaded: bool
    ver: str
    entries: list[tuple[str, dict[str, str]]]
    accounts: dict[int, dict[str, dict[str, str]]]


class HotState:
    def __init__(self, redis: Redis, fast: FastRedis, keys: Keys) -> None:
        self.redis = redis  # redis-py: everything off the hot path
        self.fast = fast  # pipelined client: the scripts
        self.keys = keys
        self.cache: CheckCache | None = None  # plain checks' answers (main.py sets it up)
        lib = (LUA_DIR / "lib.lua").read_text()
        self._scripts: dict[str, Script] = {
            name: Script(fast, lib + (LUA_DIR / f"{name}.lua").read_text()) for name in SCRIPTS
        }
        self._decide = self._scripts["decide"]  # the hot path's script, one lookup less
        self._index_add = (LUA_DIR / "index_add.lua").read_text()
        self._index_drop = redis.register_script((LUA_DIR / "index_drop.lua").read_text())
        self._announced: dict[int, float] = {}  # float-ok: root id -> monotonic s of its announcement

    def _announcement(self, root_id: int) -> tuple[bytes, float] | None:  # float-ok: monotonic s
        """The index announcement a journalling call of this root must send first, if due: the
        command, and the time to remember once it was applied. EVAL with the source (no
        NOSCRIPT to recover from after a Redis restart: it must run before the call it
        precedes, and it runs once a second per root at most); on the hot-path connection, as it
        only writes (a read there would be tracked for the check cache)."""
        now = time.monotonic()
        if now - self._announced.get(root_id, -INDEX_EVERY_S) < INDEX_EVERY_S:
            return None
        return hiredis.pack_command(("EVAL", self._index_add, 1,  # type: ignore[arg-type]
                                     self.keys.journal_index_of(root_id), root_id)), now

    def recent_roots(self) -> list[int]:
        """The roots this process journalled for lately (those it remembers announcing)."""
        return list(self._announced)

    def _announced_at(self, root_id: int, sent: float) -> None:  # float-ok: monotonic s
        announced = self._announced
        if len(announced) >= INDEX_MEMORY:
            stale = time.monotonic() - INDEX_EVERY_S
            for root in [r for r, at in announced.items() if at < stale]:
                del announced[root]
        announced[root_id] = sent

    async def _journalling(self, script: Script, root_id: int, keys: list[str],
                           args: list[Any]) -> Any:
        """Run a script that may append to the root's journal, announced first when due."""
        announcement = self._announcement(root_id)
        if announcement is None:
            return await script(keys=keys, args=args)
        command, sent = announcement
        result, announced = await script.after(command, keys=keys, args=args)
        if announced:
            self._announced_at(root_id, sent)
        return result

    async def _run(self, name: str, root_id: int, args: list[Any]) -> Any:
        return await self._scripts[name](keys=[self.keys.root(root_id)], args=args)

    async def decide(self, root_id: int, now_ms: int, events: list[DecideArgs],
                     tracked: tuple[str, ...] = ()) -> list[Decision] | None:
        """Decide (and for c/u modes apply) events of one root; None when the root is cold.
        `tracked`: keys declared only so that Redis tracks them for the check cache."""
        args: list[Any] = [now_ms, now_ms // DAY_MS, MARK_TTL_S]
        for event in events:
            args.extend(event.argv())
        keys = [self.keys.root(root_id), *tracked]
        if all(event.mode == "q" for event in events):  # checks: nothing is journalled
            raw = await self._decide(keys=keys, args=args)
        else:
            raw = await self._journalling(self._decide, root_id, keys, args)
        if raw and raw[0] == "cold":
            return None
        return [Decision(r[0], int(r[1]), int(r[2]), r[3], r[4], r[5], r[6], r[7],
                         int(r[8]) if len(r) > 8 else 0) for r in raw]

    async def ledger_op(self, root_id: int, now_ms: int, op: LedgerOpArgs) -> LedgerOpResult:
        raw = await self._journalling(self._scripts["ledger_op"], root_id,
                                      [self.keys.root(root_id)], [
            now_ms, op.kind, op.account_id, op.chain, op.balance_id, op.amount, op.definition,
            op.at_ms, op.payload,
        ])
        if raw[0] != "ok":
            return LedgerOpResult(raw[0], remaining=int(raw[1]) if len(raw) > 1 else 0)
        return LedgerOpResult("ok", int(raw[1]), int(raw[2]), raw[3], raw[4], raw[5], raw[6],
                              int(raw[7]))

    async def set_account(self, root_id: int, account_id: int, status: str, parent: str) -> None:
        await self._run("account", root_id, [account_id, status, parent])

    async def snapshot(self, root_id: int) -> tuple[bool, str, list[tuple[str, dict[str, str]]]]:
        loaded, ver, entries = await self._run("snapshot", root_id, [])
        return bool(loaded), str(ver), [(eid, _pairs(fields)) for eid, fields in entries]

    async def dump(self, root_id: int, account_ids: list[int]) -> Dump:
        """A root's accounts as installed, with its op counter and unflushed journal, read
        atomically (dump.lua); `accounts` is empty when the root is cold."""
        loaded, ver, entries, found = await self._run("dump", root_id, account_ids)
        accounts = {account_id: {kind: _pairs(fields) for kind, fields in zip("abdo", hashes,
                                                                           strict=True)}
                    for account_id, hashes in zip(account_ids, found, strict=False)}
        return Dump(bool(loaded), str(ver), [(eid, _pairs(f)) for eid, f in entries], accounts)

    async def ops_counter(self, root_id: int) -> str:
        return str(await self.redis.get(self.keys.ops(root_id)) or "0")

    async def install(self, root_id: int, ver: str, gen: str, now_ms: int, state_json: str) -> str:
        """Install a rebuilt root, announced in the journal index first whatever this process
        remembers: after a FLUSHALL the index is empty, and other processes may still count on
        an announcement they made before it (only an installed root takes journal entries)."""
        self._announced.pop(root_id, None)
        return str(await self._journalling(self._scripts["install"], root_id,
                                           [self.keys.root(root_id)],
                                           [ver, gen, now_ms, state_json]))

    async def set_watch(self, root_id: int, account_id: int, name: str, credit_type: str,
                        threshold: int | None, op: str, now_ms: int) -> bool:
        """Set (or with None remove) a threshold watch; False when the root is cold."""
        args = [account_id, name, credit_type, "" if threshold is None else threshold, op, now_ms]
        return bool(await self._run("watch", root_id, args))

    async def ack(self, batches: dict[int, list[str]]) -> dict[int, str]:
        """Drop committed journal entries of several roots in one pipeline; each root's gen."""
        roots = list(batches)
        gens = await self._scripts["ack"].many([([self.keys.root(r)], batches[r]) for r in roots])
        return {root: str(gen) for root, gen in zip(roots, gens, strict=True)}

    async def invalidate(self, root_id: int) -> None:
        """Forget a root's hot state; the next request rebuilds it from Postgres. The root's
        operation counter moves too, so a rebuild already under way (its Postgres snapshot
        perhaps older than the change that called for this) cannot install: install.lua
        refuses a counter that moved since the snapshot, and the rebuild starts again."""
        async with self.redis.pipeline(transaction=True) as pipe:
            self._forget(pipe, root_id)
            await pipe.execute()

    def _forget(self, pipe: Pipeline, root_id: int) -> None:
        """The commands of `invalidate`, queued in a transaction of the caller's."""
        pipe.delete(self.keys.root(root_id))
        pipe.incr(self.keys.ops(root_id))

    async def read_account(self, root_id: int, account_id: int,
                           tracked: tuple[str, ...] = ()) -> list[Any] | None:
        """read.lua's answer, None when the root is cold. `tracked`: keys declared only so that
        Redis tracks them for this process (a balance stream's wake-up)."""
        raw = await self._scripts["read"](keys=[self.keys.root(root_id), *tracked],
                                          args=[account_id])
        return None if raw and raw[0] == "cold" else list(raw)

    async def accounts_without_marks(self, root_id: int, account_ids: list[int],
                                     now_ms: int) -> list[int]:
        """Accounts with no uid bucket for today or yesterday: their marks may be lost."""
        today = now_ms // DAY_MS
        async with self.redis.pipeline(transaction=False) as pipe:
            for account_id in account_ids:
                pipe.exists(self.keys.uid_bucket(root_id, account_id, today),
                            self.keys.uid_bucket(root_id, account_id, today - 1))
            found = await pipe.execute()
        return [a for a, n in zip(account_ids, found, strict=True) if not n]

    async def restore_marks(self, root_id: int, marks: list[tuple[int, int, str]]) -> None:
        """Re-remember committed uids: (account id, day, uid). Safe at any time: a mark for a
        committed uid is always true."""
        by_key: dict[str, list[str]] = defaultdict(list)
        for account_id, day, uid in marks:
            by_key[self.keys.uid_bucket(root_id, account_id, day)].append(uid)
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, uids in by_key.items():  # one command per bucket and 1,000 uids
                for start in range(0, len(uids), 1000):
                    pipe.hset(key, mapping=dict.fromkeys(uids[start:start + 1000], "1"))
                pipe.expire(key, MARK_TTL_S)
            await pipe.execute()

    async def journal_entries(self, root_id: int, max_id: str, min_id: str = "-"
                              ) -> list[tuple[str, dict[str, str]]]:
        entries = await self.redis.xrange(self.keys.journal(root_id), min_id, max_id) or []
        return [(str(eid), _pairs(fields)) for eid, fields in entries]

    async def drop_entry(self, root_id: int, entry_id: str,
                         mark: tuple[int, int, str] | None) -> bool:
        """Remove one journal entry that will never be committed, with the uid mark it made
        ((account id, day, uid) of a usage event), and forget the root's hot state in the same
        transaction: the next request rebuilds it from Postgres and the rest of the journal,
        without the entry's effect. False when the entry was not there."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xdel(self.keys.journal(root_id), entry_id)
            if mark is not None:
                account_id, day, uid = mark
                pipe.hdel(self.keys.uid_bucket(root_id, account_id, day), uid)
            self._forget(pipe, root_id)
            removed = (await pipe.execute())[0]
        return bool(removed)

    async def sweep_journals(self, root_ids: list[int], max_id: str
                             ) -> list[list[tuple[str, dict[str, str]]]]:
        """Each root's journal entries up to `max_id`, pipelined; an empty journal is deleted
        (sweep.lua)."""
        found = await self._scripts["sweep"].many([([self.keys.root(r)], [max_id])
                                                   for r in root_ids])
        return [[(str(eid), _pairs(fields)) for eid, fields in entries or []]
                for entries in found]

    async def announced_before(self, shard: int, before_ms: int, limit: int) -> list[int]:
        """Roots of one index shard last announced at or before `before_ms` (Redis time)."""
        found = await self.redis.zrange(self.keys.journal_index(shard), "-inf", before_ms,
                                        byscore=True, offset=0, num=limit)
        return [int(root) for root in found]  # type: ignore[arg-type]  # (no WITHSCORES)

    async def unindex(self, shard: int, before_ms: int, root_ids: list[int]) -> int:
        """Drop roots from the index unless announced again after `before_ms`."""
        if not root_ids:
            return 0
        return int(await self._index_drop(keys=[self.keys.journal_index(shard)],
                                          args=[before_ms, *root_ids]))

    async def index(self, root_id: int) -> None:
        """Announce a root in the journal index now (the sweep's scan of the keyspace puts the
        journals it finds there)."""
        await self.redis.eval(self._index_add, 1, self.keys.journal_index_of(root_id),
                              str(root_id))


def _pairs(fields: Any) -> dict[str, str]:
    if isinstance(fields, dict):
        return {str(k): str(v) for k, v in fields.items()}
    return {str(fields[i]): str(fields[i + 1]) for i in range(0, len(fields), 2)}


def pairs(flat: list[str]) -> dict[str, str]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}
