"""The workers' sampled check of the hot copy: every `verify_every_s`, each process compares one
loaded root, picked at random, with what a rebuild would install now (`Loader.verify`, as
`creditgate hotstate verify` does). A difference seen again at the next pass (a status change
reaches Redis an instant after Postgres, so one look is not enough) is logged with what
differs, counted in /metrics, and repaired: the root is dropped from Redis and the next
request rebuilds it from Postgres.

Nothing is expected to be found: the check is there so that a bug or an outside write to Redis
that made the hot copy wrong is noticed and healed, not served until the next rebuild.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.errors import Unavailable
from app.hotstate.keys import root_of
from app.hotstate.store import HotState
from app.ledger.loader import Drift
from app.settings import Seconds

if TYPE_CHECKING:
    from app.context import AppContext

log = logging.getLogger(__name__)
PAGES = 10  # scan pages looked at for a loaded root, when this process wrote to none


def seen_in(found: list[Drift]) -> frozenset[tuple[int, str]]:
    """What a difference is about (account, what), to match it against a second look's."""
    return frozenset((d.account_id, d.what) for d in found)


def seen_again(seen: frozenset[tuple[int, str]], found: list[Drift] | None) -> list[Drift]:
    """The differences of a second look (None: the root went cold) that the first saw too."""
    return [d for d in found or [] if (d.account_id, d.what) in seen]


@dataclass
class HotCheck:
    """A process's sampled checks: when the next is due, the root whose first look found a
    difference (looked at again at the next pass), and what was counted."""

    due_at: float = 0.0  # float-ok: monotonic seconds
    suspect: tuple[int, frozenset[tuple[int, str]]] | None = None
    verified: int = 0  # roots compared
    repaired: int = 0  # roots found different twice, and dropped


async def random_root(hot: HotState, pages: int = PAGES) -> int | None:
    """A root picked at random: one this process wrote to lately (where a wrong copy would do
    harm), else one of the first loaded roots a scan of the keyspace meets (at most `pages`
    pages of ~1,000 keys); None when neither finds one."""
    recent = hot.recent_roots()
    if recent:
        return random.choice(recent)
    cursor = 0
    for _ in range(pages):
        cursor, keys = await hot.redis.scan(cursor, match=hot.keys.root_pattern, count=1000)
        if keys:
            return root_of(str(random.choice(keys)))
        if cursor == 0:
            break
    return None


async def check_sampled(ctx: AppContext, memory: HotCheck, every: Seconds,
                        root_id: int | None = None) -> int:
    """One pass's share: the suspect's second look when there is one, else a new root when one
    is due, `every` seconds after the last (`root_id`: that one instead of a random one; 0:
    nothing at all). Returns the roots repaired."""
    if every <= 0:
        return 0
    if memory.suspect is not None:
        root, seen = memory.suspect
        memory.suspect = None
        try:
            found = seen_again(seen, await ctx.loader.verify(root))
        except Unavailable:
            return 0
        if not found:
            return 0
        log.error("hot state of root %s differed from Postgres twice, dropped for a rebuild: %s",
                  root, "; ".join(f"account {d.account_id} {d.what}: {d.redis!r} in Redis, "
                                  f"{d.postgres!r} in Postgres" for d in found))
        await ctx.hot.invalidate(root)
        memory.repaired += 1
        return 1
    now = time.monotonic()
    if now < memory.due_at:
        return 0
    first_pass, memory.due_at = not memory.due_at, now + every
    if first_pass:  # a process's first check comes one period after it started
        return 0
    picked = root_id if root_id is not None else await random_root(ctx.hot)
    if picked is None:
        return 0
    try:
        first = await ctx.loader.verify(picked)
    except Unavailable:  # it kept changing: another root another time
        return 0
    if first is None:  # cold
        return 0
    memory.verified += 1
    if first:
        memory.suspect = (picked, seen_in(first))
    return 0
