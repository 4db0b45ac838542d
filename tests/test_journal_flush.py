"""A journal flush writes each usage event once, however often its records come back: the
plain insert of the usual flush (a COPY when it is large) falls back to the keyed one when any
row is in already. The
orphan sweep finds the journals to read in the journal index (and, on a process's first pass,
by a scan of the keyspace), deletes a journal it finds empty, and the next one's ids go on
after its last."""

from __future__ import annotations

import asyncio
import dataclasses
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from app.ledger import repository as repo
from app.ledger.journal import Journal, JournalRecord
from app.ledger.repository import ms_to_dt
from tests.conftest import Api
from tests.journal_helpers import new_root, written
from tests.webhook_receiver import eventually


@pytest.fixture
def copies(monkeypatch: pytest.MonkeyPatch, app: Any) -> list[bool]:
    """Every flush of the session app's journal tries COPY, however small; what each try
    returned (True: it wrote)."""
    tried: list[bool] = []
    copied = repo._copied

    async def spy(conn: Any, rows: Any) -> bool:
        tried.append(await copied(conn, rows))
        return tried[-1]

    monkeypatch.setattr(app.state.ctx.journal, "copy_from_rows", 1)
    monkeypatch.setattr(repo, "_copied", spy)
    return tried


@pytest.mark.parametrize("by_copy", [False, True], ids=["statement", "copy"])
async def test_a_repeated_flush_a_mixed_one_and_a_doubled_key_each_write_once(
        api: Api, app: Any, db: asyncpg.Connection, by_copy: bool,
        request: pytest.FixtureRequest) -> None:
    tried = request.getfixturevalue("copies") if by_copy else None
    root = await new_root(api, app, db)
    if tried is not None:
        tried.clear()  # (the grant's)
    ctx = root.ctx

    first = await root.decided(150)
    assert await ctx.journal.flush([first]) == ["accepted"]
    assert await written(db, first) == {first.payload["uid"]: (1, -150)}
    # the sweeper flushes the same entry again: its own, so accepted, and nothing is added
    assert await ctx.journal.flush([first]) == ["accepted"]
    assert await written(db, first) == {first.payload["uid"]: (1, -150)}

    # a flush holding an old record and a new one: the new one is still written
    second = await root.decided(275)
    assert await ctx.journal.flush([first, second]) == ["accepted", "accepted"]
    assert await written(db, first, second) == {first.payload["uid"]: (1, -150),
                                                 second.payload["uid"]: (1, -275)}

    # one uid applied twice by a Redis that forgot it: the first is kept, the other is not
    third = await root.decided(100)
    again = dataclasses.replace(third, stream_id="1-1")
    assert await ctx.journal.flush([third, again]) == ["accepted", "duplicate"]
    assert await written(db, third) == {third.payload["uid"]: (1, -100)}
    assert Decimal(await api.available(root.code)) == Decimal("94.75")
    if tried is not None:  # the first went in by COPY; each later one had a row in already
        assert tried == [True, False, False, False]


async def test_a_flush_by_copy_writes_every_column_as_the_records_say(
        api: Api, app: Any, db: asyncpg.Connection, copies: list[bool]) -> None:
    """COPY's rows are the statement's: times to the millisecond, NULLs where an entry has no
    balance (overage) or no usage uid and product (a grant), a description with a tab or a
    backslash kept as it was (that flush goes the statement's way), and a flush with events
    (a transaction of its own) falls back to the keyed insert inside it when a row is in."""
    root = await new_root(api, app, db)
    copies.clear()  # (the grant's)
    ok = await root.decided(30)
    over = await root.decided(10_000)  # 99.70 left: drawn whole, 0.30 owed, entitlement revoked
    assert over.allocations and over.overage == 30 and over.flag_changes
    assert await root.ctx.journal.flush([ok, over]) == ["accepted", "accepted"]
    assert copies == [True]

    rows = await db.fetch(
        "SELECT * FROM ledger_entries WHERE usage_uid = ANY($1) ORDER BY usage_uid, seq",
        [ok.payload["uid"], over.payload["uid"]])
    got = [(r["op_key"], r["seq"], r["account_id"], r["balance_id"] is None, r["credit_type_id"],
            r["kind"], r["amount"], r["usage_uid"], r["product_code"], r["description"],
            r["created_at"], r["journal_id"]) for r in rows]
    expected = []
    for rec, debits in ((ok, ["-0.30"]), (over, ["-99.70", "-0.30"])):
        for seq, amount in enumerate(debits):
            overage = rec is over and seq == 1
            expected.append((rec.op_key, seq, root.id, overage, root.ct_id,
                             "overage" if overage else "debit", Decimal(amount),
                             rec.payload["uid"], root.product, "", ms_to_dt(rec.recorded_ms),
                             rec.journal_id))
    assert sorted(got) == sorted(expected)
    events = await db.fetch(
        "SELECT uid, product_code, credit_type_id, amount, overage, event_time, recorded_at "
        "FROM usage_events WHERE account_id = $1", root.id)
    assert sorted(tuple(e) for e in events) == sorted(
        (r.payload["uid"], root.product, root.ct_id, Decimal(amount), Decimal(owed),
         ms_to_dt(r.payload["ts"]), ms_to_dt(r.recorded_ms))
        for r, amount, owed in ((ok, "0.30", "0"), (over, "100.00", "0.30")))

    # the overage one again, with a new one: events make it a transaction, and the COPY that
    # meets the row already in rolls back to its savepoint, so the keyed insert still runs
    later = await root.decided(5)
    assert await root.ctx.journal.flush([over, later]) == ["accepted", "accepted"]
    assert copies == [True, False]
    assert await written(db, ok, over, later) == {
        ok.payload["uid"]: (1, -30), over.payload["uid"]: (1, -10_000),
        later.payload["uid"]: (1, -5)}

    # grants: a balance row and an entry with no usage uid or product, in a transaction; a
    # description COPY's text format would read otherwise goes in by the statement
    descriptions = ["top-up", "a\ttab", "back\\slash and \\N", "new\nline", "carriage\rreturn"]
    copies.clear()
    ids = [(await api.grant(root.code, "2.00", description=d))["id"] for d in descriptions]
    assert copies == [True, False, False, False, False]
    grants = {r["balance_id"]: tuple(r)[1:] for r in await db.fetch(
        "SELECT balance_id, amount, usage_uid, product_code, description FROM ledger_entries "
        "WHERE balance_id = ANY($1) AND kind = 'grant'", ids)}
    assert grants == {i: (Decimal("2.00"), None, None, d) for i, d in zip(ids, descriptions, strict=True)}


async def test_the_index_sweep_commits_an_orphan_deletes_the_journal_and_its_successor_goes_on(
        api: Api, app: Any, db: asyncpg.Connection) -> None:
    root = await new_root(api, app, db)
    ctx, account_id = root.ctx, root.id
    hot = ctx.hot
    journal, last = hot.keys.journal(account_id), hot.keys.tag(account_id) + ":jl"
    index = hot.keys.journal_index_of(account_id)
    for _ in range(3):
        await api.usage(root.code, root.product, "1.00")
    # decided in Redis and never committed, as by a process that died right after its Lua call
    orphan = await root.decided(40)
    # announced in the journal index before the first entry was written
    announced = await hot.redis.zscore(index, str(account_id))
    assert announced is not None

    async def swept() -> bool:
        # the app's own sweeper (every 0.5 s): once the root's last announcement is older than
        # the orphan age plus the index lag, the orphan is committed, the journal (empty now)
        # deleted, and the root dropped from the index
        return (await written(db, orphan) == {orphan.payload["uid"]: (1, -40)}
                and not await hot.redis.exists(journal)
                and await hot.redis.zscore(index, str(account_id)) is None)

    await eventually(swept, 20)
    kept = await hot.redis.get(last)
    assert kept is not None and kept.count("-") == 1
    assert Decimal(await api.available(root.code)) == Decimal("96.60")

    # within the same millisecond as the last id (here: one from the future), the next entry
    # still gets a larger id: a root's webhooks are ordered by it; and its root is announced
    # again (the process's announcement is more than a second old)
    await hot.redis.set(last, "99999999999999-7")
    record = await root.decided(100)
    assert record.stream_id == "99999999999999-8"
    assert await hot.redis.zscore(index, str(account_id)) is not None
    assert await ctx.journal.flush([record]) == ["accepted"]
    assert await written(db, record) == {record.payload["uid"]: (1, -100)}


async def test_a_journal_missing_from_the_index_is_found_by_a_process_s_first_sweep_only(
        api: Api, app: Any, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    """A journal written before the index existed, or whose announcement a failover lost: the
    keyspace scan of a process's first sweep finds it; later sweeps read only the index."""
    root = await new_root(api, app, db)
    ctx, account_id = root.ctx, root.id
    hot = ctx.hot
    orphan = await root.decided(250)
    await hot.redis.zrem(hot.keys.journal_index_of(account_id), str(account_id))
    await asyncio.sleep(ctx.settings.journal_orphan_ms / 1000 + 0.1)  # past the orphan age
    scans = 0
    scan_iter = hot.redis.scan_iter

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal scans
        scans += 1
        return scan_iter(*args, **kwargs)

    monkeypatch.setattr(hot.redis, "scan_iter", counted)
    # the running app's sweeper made its first pass long ago: it does not see the orphan
    await asyncio.sleep(3 * ctx.settings.worker_interval_s)
    assert (scans, await written(db, orphan)) == (0, {orphan.payload["uid"]: (0, 0)})

    restarted = Journal(ctx.pool, hot)  # a process started now
    assert await restarted.sweep(ctx.settings.journal_orphan_ms) >= 1
    assert scans == 1
    assert await written(db, orphan) == {orphan.payload["uid"]: (1, -250)}
    assert not await hot.redis.exists(hot.keys.journal(account_id))
    await restarted.sweep(ctx.settings.journal_orphan_ms)
    assert scans == 1
    assert Decimal(await api.available(root.code)) == Decimal("97.50")


async def test_an_index_entry_announced_again_while_swept_stays(api: Api, app: Any,
                                                                db: asyncpg.Connection) -> None:
    """The sweep drops a root from the index only if no process announced it again after the
    sweep read it: a process that announced meanwhile may have journalled since."""
    root = await new_root(api, app, db)
    hot = root.ctx.hot
    index = hot.keys.journal_index_of(root.id)
    others = [root.id + 16 * n for n in (1, 2)]  # (same shard; no journals of theirs needed)
    await hot.redis.zadd(index, {str(root.id): 1_000, str(others[0]): 2_000,
                                 str(others[1]): 9_000})
    assert await hot.announced_before(root.id % 16, 5_000, 10) == [root.id, others[0]]
    await hot.redis.zadd(index, {str(others[0]): 7_000})  # announced after the read
    assert await hot.unindex(root.id % 16, 5_000, [root.id, others[0]]) == 1
    assert await hot.redis.zscore(index, str(root.id)) is None
    assert await hot.redis.zscore(index, str(others[0])) == 7_000
    await hot.redis.zrem(index, *[str(o) for o in others])


async def test_a_rebuilt_root_is_announced_again_at_once(api: Api, app: Any,
                                                         db: asyncpg.Connection) -> None:
    """Redis lost a root and its index entry (FLUSHALL, here for one root) less than a second
    after this process announced it: the rebuild announces it again before installing, as any
    other process may go on journalling on an announcement made before the loss."""
    root = await new_root(api, app, db)
    hot = root.ctx.hot
    index = hot.keys.journal_index_of(root.id)
    await api.usage(root.code, root.product, "1.00")
    assert await hot.redis.zscore(index, str(root.id)) is not None
    await hot.redis.delete(hot.keys.root(root.id))
    await hot.redis.zrem(index, str(root.id))
    await api.usage(root.code, root.product, "1.00")  # cold: rebuilt, then decided
    assert await hot.redis.zscore(index, str(root.id)) is not None
    assert Decimal(await api.available(root.code)) == Decimal("98.00")


async def test_a_stopping_journal_commits_what_is_queued_before_it_stops(
        api: Api, app: Any, db: asyncpg.Connection) -> None:
    """A graceful stop (SIGTERM, a deploy) does not leave debits queued for the group commit
    to another process's sweeper: they are committed before the journal stops."""
    root = await new_root(api, app, db)
    journal = Journal(root.ctx.pool, root.ctx.hot)
    journal.start()
    records = [await root.decided(10) for _ in range(20)]
    for record in records:
        journal.commit_soon([record])  # queued, not yet taken by the flush loop
    await journal.stop()
    assert await written(db, *records) == {r.payload["uid"]: (1, -10) for r in records}


async def test_a_record_postgres_cannot_take_fails_its_own_request_and_entry_only(
        api: Api, app: Any, db: asyncpg.Connection) -> None:
    """One record that cannot be written (here: a time past what a timestamp holds, as a grant
    expiring in 9999 once had) does not take others down with it. Requests committed in one
    flush with it are flushed again request by request, so only its own fails; the orphan
    sweep commits the other roots' journals and the root's other entries, and announces its
    root again (logged each time)."""
    root, other = await new_root(api, app, db), await new_root(api, app, db)
    hot = root.ctx.hot
    journal = Journal(root.ctx.pool, hot)
    journal.start()
    key = hot.keys.journal(root.id)
    poison_id = None
    try:
        good = [await root.decided(10) for _ in range(6)]
        # a decided entry rewritten in its journal with the impossible time
        real = await root.decided(10)
        fields = dict(await hot.journal_entries(root.id, "+"))[real.stream_id]
        await hot.redis.xdel(key, real.stream_id)
        poison_id = str(await hot.redis.xadd(key, {**fields, "t": "253402300800000"}))
        poison = JournalRecord.from_stream(root.id, poison_id, {**fields,
                                                                "t": "253402300800000"})
        records = [*good[:3], poison, *good[3:]]
        # queued in one go, so the flush loop takes them as one batch
        outcomes = await asyncio.gather(*(journal.commit([r]) for r in records),
                                        return_exceptions=True)
        assert isinstance(outcomes[3], ValueError)
        assert [o for i, o in enumerate(outcomes) if i != 3] == [["accepted"]] * 6
        assert await written(db, *good) == {r.payload["uid"]: (1, -10) for r in good}

        # an orphan of another root, swept after the poisoned root in the same pass, and one of
        # the poisoned root's own after it in its journal: both committed
        orphan, behind = await other.decided(25), await root.decided(5)
        await hot.redis.zrem(hot.keys.journal_index_of(root.id), str(root.id))
        await journal._sweep_roots([root.id, other.id], "+")
        assert await written(db, orphan, behind) == {orphan.payload["uid"]: (1, -25),
                                                     behind.payload["uid"]: (1, -5)}
        assert await written(db, poison) == {poison.payload["uid"]: (0, 0)}
        assert [eid for eid, _ in await hot.journal_entries(root.id, "+")] == [poison_id]
        assert await hot.redis.zscore(hot.keys.journal_index_of(root.id), str(root.id))
    finally:
        if poison_id is not None:  # (the session's own sweeper would meet it in every pass)
            await hot.redis.xdel(key, poison_id)
        await journal.stop()
