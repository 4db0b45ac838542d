"""The journal: changes decided in Redis, committed to Postgres in groups before any reply.

A Lua script applies a change to the hot copy and appends it to the root's stream journal in
one atomic step. The request hands the same record to this process's flusher, which writes
many records in one transaction (group commit) and then drops them from the stream. If the
process dies first, another one finds the entry still in the stream and flushes it: every
insert is keyed by the operation, so a second flush changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from app.db import Connection
from app.errors import STORE_ERRORS
from app.hotstate.keys import JOURNAL_INDEX_SHARDS, root_of
from app.hotstate.store import DAY_MS, HotState, index_lag_ms
from app.ledger import repository as repo
from app.ledger.repository import ms_to_dt
from app.money import scaled_text
from app.recharge.triggers import insert_triggers, triggers_for
from app.webhooks.outbox import Nudger, events_for, publish

log = logging.getLogger(__name__)
MAX_BATCH = 500
# one request's records waiting for the group commit, and its answer
Waiting = tuple[list["JournalRecord"], asyncio.Future[list[str]]]
SWEEP_PAGE = 500  # roots read from one index shard at a time
END_MS = 253_402_300_800_000  # 10000-01-01T00:00:00Z: past what a Python datetime holds


# ledger entry kinds of the operations not named like one; what these operations could not take
# from the balance is owed (an overage entry)
ENTRY_KINDS = {"refund": "void", "clawback": "adjustment", "pay": "adjustment"}
OWING_KINDS = ("refund", "clawback", "pay")  # with an overage entry (pay's: what it paid)


@dataclass
class JournalRecord:
    root_id: int
    stream_id: str
    kind: str  # usage|grant|adjustment|rollover|release|void|expire|refund|clawback
    payload: dict[str, Any]
    recorded_ms: int
    gen: str
    allocations: str = ""  # usage: "balance:account:amount,..."
    overage: int = 0  # usage: what no balance covered
    applied: int = 0  # other kinds: the signed change to the balance
    flag_changes: str = ""  # "product|ct|granted/revoked|available;..."
    crossings: str = ""  # threshold watches crossed: "name|account|ct|total|threshold;..."
    op_key: str = field(init=False, repr=False, compare=False)  # its rows' key (ON CONFLICT)

    @classmethod
    def from_stream(cls, root_id: int, stream_id: str, fields: dict[str, str]) -> JournalRecord:
        return cls(root_id, stream_id, fields["k"], json.loads(fields["p"]), int(fields["t"]),
                   fields.get("g", ""), fields.get("al", ""), int(fields.get("ov", "0")),
                   int(fields.get("x", "0")), fields.get("fc", ""), fields.get("wc", ""))

    @property
    def journal_id(self) -> str:
        return f"{self.root_id}:{self.stream_id}"

    @property
    def sequence(self) -> int:
        """Orders a root's changes as Lua decided them (the stream id: ms, then counter)."""
        ms, _, counter = self.stream_id.partition("-")
        return int(ms) * 100_000 + int(counter or 0)

    def __post_init__(self) -> None:
        # read several times per flush: worked out once (a cached_property locks on each first
        # read in Python 3.11, dearer than this)
        self.op_key = (f"u:{self.payload['a']}:{self.payload['uid']}" if self.kind == "usage"
                       else str(self.payload["op"]))


@dataclass
class Rows:
    """One batch of journal records as Postgres rows."""

    entries: list[tuple[Any, ...]] = field(default_factory=list)
    usage: list[tuple[Any, ...]] = field(default_factory=list)
    balances: list[tuple[Any, ...]] = field(default_factory=list)
    statuses: list[tuple[int, str]] = field(default_factory=list)
    holds: list[tuple[Any, ...]] = field(default_factory=list)  # app/entitlements/holds.py

    def add(self, rec: JournalRecord) -> None:
        # entries and usage rows carry their times as epoch milliseconds (repo.write_rows)
        p, at = rec.payload, rec.recorded_ms
        if at >= END_MS:  # Postgres would take it, and no reader could read it back
            raise ValueError(f"journal record {rec.journal_id}: its time ({at} ms) is past year 9999")
        dp, account, credit_type = int(p["dp"]), int(p["a"]), int(p["ct"])
        if rec.kind == "usage":  # (most records: its entries written out here, no helper call)
            key, uid, product, journal_id = rec.op_key, p["uid"], p["prod"], rec.journal_id
            kind, desc, seq = "debit", p.get("desc", ""), -1
            if "hx" in p:  # a hold's (app/entitlements/holds.py): its row comes with it
                kind = "hold"
                self.holds.append((account, uid[3:], product, credit_type,
                                   scaled_text(int(p["amt"]), dp), ms_to_dt(int(p["hx"]))))
            if rec.allocations:
                for seq, alloc in enumerate(rec.allocations.split(",")):
                    balance, owner, taken = alloc.split(":")
                    self.entries.append((key, seq, int(owner), int(balance), credit_type, kind,
                                         scaled_text(-int(taken), dp), uid, product, desc, at,
                                         journal_id))
            if rec.overage:
                self.entries.append((key, seq + 1, account, None, credit_type, "overage",
                                     scaled_text(-rec.overage, dp), uid, product, desc, at,
                                     journal_id))
            self.usage.append((account, uid, product, credit_type,
                               scaled_text(int(p["amt"]), dp), scaled_text(rec.overage, dp),
                               int(p["ts"]), at))
            return

        def entry(seq: int, owner: int, balance: int | None, kind: str, scaled: int) -> None:
            self.entries.append((rec.op_key, seq, owner, balance, credit_type, kind,
                                 scaled_text(scaled, dp), p.get("uid"), p.get("prod"),
                                 p.get("desc", ""), at, rec.journal_id))

        balance_id = int(p["b"])
        if rec.kind == "grant":
            bal = p["bal"]
            self.balances.append((balance_id, account, credit_type, bal["products"],
                                  bal["priority"], ms_to_dt(bal["eff"]),
                                  ms_to_dt(bal["exp"]) if bal["exp"] else None,
                                  bal["description"], bal["source"]))
            if p.get("activate"):  # a pending (purchased) balance becomes drawable
                self.statuses.append((balance_id, "active"))
        elif rec.kind in ("void", "expire", "refund"):
            self.statuses.append((balance_id, "expired" if rec.kind == "expire" else "voided"))
        entry(0, account, balance_id, ENTRY_KINDS.get(rec.kind, rec.kind), rec.applied)
        if rec.kind in OWING_KINDS and rec.overage:
            entry(1, account, None, "overage", -rec.overage)


def ops_outcome(records: list[JournalRecord], inserted: set[str], owners: dict[str, str]) -> list[str]:
    """accepted, or duplicate when another operation with the same key committed first
    (in an earlier batch, or earlier in this one: the first row of a key is the one kept)."""
    outcomes, seen = [], set()
    for r in records:
        new = r.op_key in inserted and r.op_key not in seen
        outcomes.append("accepted" if new or owners.get(r.op_key) == r.journal_id else "duplicate")
        seen.add(r.op_key)
    return outcomes


@dataclass(frozen=True)
class Stuck:
    """A journal entry Postgres does not take, and what it said."""

    record: JournalRecord
    error: str


def _log_failure(future: asyncio.Future[list[str]]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("journal commit failed; the sweeper will retry: %s", future.exception())


class Journal:
    def __init__(self, pool: asyncpg.Pool, hot: HotState, parallel: int = 4,
                 copy_from_rows: int = 0) -> None:
        self.pool = pool
        self.hot = hot
        self.copy_from_rows = copy_from_rows  # flushes of this many rows go in by COPY (0: none)
        self._queue: asyncio.Queue[Waiting] = asyncio.Queue()
        self._slots = asyncio.Semaphore(parallel)
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._scanned = False  # the keyspace scan of this process's first sweep is done
        self._nudger = Nudger(pool)  # wakes the webhook dispatchers after a flush's events
        self.sweep_failures = 0  # roots whose journal a sweep of this process could not commit

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run())

    async def stop(self, drain_s: float = 5.0) -> None:  # float-ok: seconds
        """Commit what is queued and in flight (for up to `drain_s`), then stop. What is left
        stays in its stream for another process's sweeper, as after a crash."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_s
        while (not self._queue.empty() or self._tasks) and loop.time() < deadline:
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=deadline - loop.time())
            else:
                await asyncio.sleep(0.005)  # the loop is taking the queue's next batch
        if self._loop_task:
            self._loop_task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def commit(self, records: list[JournalRecord]) -> list[str]:
        """Wait until the records are committed in Postgres; accepted/duplicate per record.
        A caller's records travel together (one future for all of them), and are committed
        in one flush with whatever else is waiting."""
        future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((records, future))
        return await future

    def commit_soon(self, records: list[JournalRecord]) -> None:
        """Queue records for the group commit without waiting for it (for callers whose
        operations are durable in Postgres already; see `debit_prepared`). An error is
        logged: the entries stay in their streams and the sweeper commits them."""
        future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_log_failure)
        self._queue.put_nowait((records, future))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """A task of the flusher's own (`stop` waits for them)."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            # wait for a free transaction slot first: whatever queues meanwhile joins this batch
            await self._slots.acquire()
            batch, size = [first], len(first[0])
            while size < MAX_BATCH and not self._queue.empty():
                item = self._queue.get_nowait()
                batch.append(item)
                size += len(item[0])
            self._spawn(self._flush_waiting(batch))

    async def _flush_waiting(self, batch: list[Waiting]) -> None:
        try:
            await self._answer(batch)
        finally:
            self._slots.release()

    async def _answer(self, batch: list[Waiting]) -> None:
        """Flush a batch and answer each request of it. A failure of the stores fails them
        all; any other (a record Postgres cannot take) is one request's: the batch is flushed
        again request by request, so only that request fails (its entry stays in its journal,
        where the sweeper meets it and logs it)."""
        try:
            outcomes = await self.flush([record for records, _ in batch for record in records],
                                        answer_before_ack=True)
        except Exception as exc:
            if len(batch) > 1 and not isinstance(exc, STORE_ERRORS):
                for one in batch:
                    await self._answer([one])
                return
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        at = 0
        for records, future in batch:
            if not future.done():
                future.set_result(outcomes[at:at + len(records)])
            at += len(records)

    async def flush(self, records: list[JournalRecord], answer_before_ack: bool = False) -> list[str]:
        """Commit records (idempotently), then drop them from their streams.

        With `answer_before_ack` the outcomes are returned as soon as Postgres committed and
        the streams are acknowledged by a task of their own: a 2xx needs the commit, not the
        ack (an entry left in its stream is re-flushed harmlessly by the sweeper, and a rebuild
        meanwhile reads it and finds it committed), and the round trip to Redis was a fifth of
        a single event's latency."""
        if not records:
            return []
        rows = Rows()
        for record in sorted(records, key=lambda r: r.op_key):  # one lock order: no deadlocks
            rows.add(record)
        events = [events_for(r) for r in records]
        triggers = [triggers_for(r) for r in records]
        queued = False
        async with self.pool.acquire() as conn:
            if rows.balances or rows.statuses or rows.holds or any(events) or any(triggers):
                async with conn.transaction():
                    inserted = await repo.write_rows(conn, rows, self.copy_from_rows)
                    outcomes = await self._outcomes(conn, records, inserted)
                    # only what this batch really committed raises events: a duplicate applied
                    # twice by a forgetful Redis must not announce a flip that never happened
                    accepted = [o == "accepted" for o in outcomes]
                    raised = [e for evts, ok in zip(events, accepted, strict=True) if ok
                              for e in evts]
                    queued = await publish(conn, raised, notify_at_commit=False)
                    await insert_triggers(conn, [t for found, ok in zip(triggers, accepted, strict=True)
                                                 if ok for t in found])
            else:  # plain usage: write_rows is atomic on its own (one statement, or COPY's
                # transaction)
                inserted = await repo.write_rows(conn, rows, self.copy_from_rows)
                outcomes = await self._outcomes(conn, records, inserted)
        if queued:  # after the commit, off the flush's path (outbox.CHANNEL)
            self._nudger.after_commit(self._spawn)
        if answer_before_ack:
            self._spawn(self._after_commit(records, outcomes))
        else:
            await self._after_commit(records, outcomes)
        return outcomes

    async def _outcomes(self, conn: Connection, records: list[JournalRecord],
                        inserted: set[str]) -> list[str]:
        missing = [r.op_key for r in records if r.op_key not in inserted]
        owners = await repo.op_owners(conn, missing) if missing else {}
        return ops_outcome(records, inserted, owners)

    async def _after_commit(self, records: list[JournalRecord], outcomes: list[str]) -> None:
        by_root: dict[int, list[JournalRecord]] = defaultdict(list)
        stale: set[int] = set()
        for record, outcome in zip(records, outcomes, strict=True):
            by_root[record.root_id].append(record)
            if outcome == "duplicate":  # the hot copy applied it twice: rebuild from Postgres
                stale.add(record.root_id)
        try:
            gens = await self.hot.ack({root_id: [r.stream_id for r in group]
                                       for root_id, group in by_root.items()})
            for root_id, gen in gens.items():
                if gen and any(r.gen != gen for r in by_root[root_id]):
                    # a rebuild ran while these were in flight and may have missed them
                    stale.add(root_id)
            for root_id in stale:
                await self.hot.invalidate(root_id)
        except STORE_ERRORS:
            # committed all the same; the entries stay in the stream and a later sweep
            # re-flushes them harmlessly
            log.warning("journal ack failed; entries will be re-flushed by the sweeper")

    async def recover_root(self, root_id: int, max_id: str = "+") -> int:
        records = [JournalRecord.from_stream(root_id, eid, fields)
                   for eid, fields in await self.hot.journal_entries(root_id, max_id)]
        await self.flush(records)
        return len(records)

    async def sweep(self, orphan_ms: int) -> int:
        """Flush journal entries older than orphan_ms: left behind by a process that died.

        Reads the roots of the journal index (keys.py) announced long enough ago that all their
        entries are past the orphan age, flushes what their journals still hold, deletes the
        journals found empty, and drops the roots from the index (unless announced again
        meanwhile). The first sweep of a process also scans the keyspace for journals: those
        written before the index existed, or whose announcement a failover lost. Returns the
        entries flushed."""
        now = await self._redis_ms()
        cutoff = f"{now - orphan_ms}"
        found = 0
        if not self._scanned:
            found += await self._sweep_keyspace(cutoff)
            self._scanned = True
        quiet_since = now - index_lag_ms(orphan_ms)
        for shard in range(JOURNAL_INDEX_SHARDS):
            while roots := await self.hot.announced_before(shard, quiet_since, SWEEP_PAGE):
                found += await self._sweep_roots(roots, cutoff)
                await self.hot.unindex(shard, quiet_since, roots)
                if len(roots) < SWEEP_PAGE:
                    break
        return found

    async def _sweep_roots(self, root_ids: list[int], cutoff: str) -> int:
        found = 0
        recovered = []
        for root_id, entries in zip(root_ids, await self.hot.sweep_journals(root_ids, cutoff),
                                    strict=True):
            if not entries:
                continue
            records = [JournalRecord.from_stream(root_id, eid, f) for eid, f in entries]
            stuck = await self._committed_apart(records)
            found += len(records) - len(stuck)
            if stuck:
                # an entry Postgres cannot take must not stop the sweep of every other root,
                # nor hold back its own root's other entries (committed one by one above):
                # logged, and the root announced again, so each later sweep tries it again
                log.error("journal of root %s: entries Postgres refuses (`creditgate journal "
                          "stuck` names them, `creditgate journal drop` takes one out): %s",
                          root_id, "; ".join(f"{s.record.stream_id} {s.record.op_key}: "
                                             f"{s.error}" for s in stuck))
                self.sweep_failures += 1
                await self.hot.index(root_id)
                continue
            recovered.append(root_id)
        if recovered:  # their journals are empty now (the flush acknowledged the entries)
            await self.hot.sweep_journals(recovered, cutoff)
        return found

    async def stuck(self, older_than_ms: int) -> list[Stuck]:
        """The journal entries older than `older_than_ms` that Postgres does not take, each with
        its error, found as the sweeper finds them but over every journal in Redis: a root's
        old entries are flushed together, and when that fails one by one. So what can be
        committed is committed on the way (as the sweeper would), and only the entries that
        fail on their own are named."""
        cutoff = str(await self._redis_ms() - older_than_ms)
        found: list[Stuck] = []
        async for key in self.hot.redis.scan_iter(match=self.hot.keys.journal_pattern,
                                                   count=1000, _type="stream"):
            root_id = root_of(str(key))
            found += await self._committed_apart(
                [JournalRecord.from_stream(root_id, eid, fields)
                 for eid, fields in await self.hot.journal_entries(root_id, cutoff)])
        return found

    async def _committed_apart(self, records: list[JournalRecord]) -> list[Stuck]:
        """Flush records together, and when Postgres refuses that, one by one: the ones it
        refuses on their own, with its error (the rest are committed)."""
        if await self._refused(records) is None:
            return []
        found = []
        for record in records:
            error = await self._refused([record])
            if error is not None:
                found.append(Stuck(record, error))
        return found

    async def drop(self, root_id: int, entry_id: str) -> tuple[str, JournalRecord]:
        """Take an entry Postgres will not take out of its root's journal, undoing its effect
        on the hot state (the root is rebuilt from Postgres, the uid of a usage event can be
        sent again). Its request was never answered with a 2xx (a 2xx waits for the commit),
        so nothing acknowledged is lost. The entry is flushed once more first: ("committed",
        record) when that works, ("dropped", record) when it did not and the entry is gone.
        LookupError: no such entry."""
        entries = await self.hot.journal_entries(root_id, entry_id, entry_id)
        if not entries:
            raise LookupError(f"root {root_id} has no journal entry {entry_id}")
        record = JournalRecord.from_stream(root_id, *entries[0])
        if await self._refused([record]) is None:
            return "committed", record
        mark = None
        if record.kind == "usage":  # decide.lua marks the uid in the bucket of the entry's day
            mark = (int(record.payload["a"]), record.recorded_ms // DAY_MS,
                    str(record.payload["uid"]))
        await self.hot.drop_entry(root_id, entry_id, mark)
        log.warning("journal of root %s: entry %s (%s) dropped uncommitted", root_id, entry_id,
                    record.op_key)
        return "dropped", record

    async def _refused(self, records: list[JournalRecord]) -> str | None:
        """Flush the records; why Postgres refused them, None when they are committed. An
        error of the stores themselves is raised (nothing can be told of the records)."""
        try:
            await self.flush(records)
        except STORE_ERRORS:
            raise
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    async def _redis_ms(self) -> int:
        seconds, micros = await self.hot.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def _sweep_keyspace(self, cutoff: str) -> int:
        found = 0
        pattern = self.hot.keys.journal_pattern
        async for key in self.hot.redis.scan_iter(match=pattern, count=1000, _type="stream"):
            root_id = root_of(str(key))
            await self.hot.index(root_id)  # (swept again from the index once it is quiet)
            found += await self._sweep_roots([root_id], cutoff)
        return found
