"""Every Redis key creditgate uses. All keys of a billing root share the hash tag `{<root id>}`;
the per-account keys below the root key are derived inside the Lua scripts (lib.lua).

The prefix (default `cg`) lets several deployments, or test sessions, share one Redis.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "cg"
# `<p>:{<root>}:root`  hash   {gen}: present while the root is loaded
# `<p>:{<root>}:v`     string operation counter, bumped by every script call that journals
# `<p>:{<root>}:j`     stream journal of changes not yet committed to Postgres (deleted by
#                      the orphan sweep when it finds it empty: sweep.lua)
# `<p>:{<root>}:jl`    string the last id the deleted journal stream gave (its successor's
#                      ids go on after it)
# `<p>:{<root>}:a:<account>` hash {st, par}
# `<p>:{<root>}:b:<account>` hash balance id -> remaining (scaled integer)
# `<p>:{<root>}:d:<account>` hash balance id -> definition "ct|priority|eff|exp|status|products"
# `<p>:{<root>}:o:<account>` hash credit type -> overage (scaled integer)
# `<p>:{<root>}:e:<account>` hash "product|ct" -> entitlement flag "1"/"0"
# `<p>:{<root>}:u:<account>:<day>` hash of usage uids seen that day
# `<p>:{jx:<shard>}:roots` sorted set: root id -> last time (Redis ms) a process announced it
#                      would journal for that root (the journal index: the orphan sweep reads
#                      it instead of scanning the keyspace; app/ledger/journal.py)

JOURNAL_INDEX_SHARDS = 16  # each a key of its own hash tag: spread over a cluster's nodes


@dataclass(frozen=True)
class Keys:
    prefix: str = DEFAULT_PREFIX

    def tag(self, root_id: int) -> str:
        return f"{self.prefix}:{{{root_id}}}"

    def root(self, root_id: int) -> str:
        return f"{self.tag(root_id)}:root"

    def ops(self, root_id: int) -> str:
        """The root's operation counter (lib.lua `journal`, snapshot.lua, install.lua)."""
        return f"{self.tag(root_id)}:v"

    def journal(self, root_id: int) -> str:
        return f"{self.tag(root_id)}:j"

    def uid_bucket(self, root_id: int, account_id: int, day: int) -> str:
        return f"{self.tag(root_id)}:u:{account_id}:{day}"

    def check_reads(self, root_id: int, chain: tuple[int, ...]) -> tuple[str, ...]:
        """The hashes a check's answer depends on: each chain account's status, remaining
        amounts and balance definitions (declared to Redis for the check cache)."""
        tag = self.tag(root_id)
        return tuple(f"{tag}:{kind}:{account}" for account in chain for kind in "abd")

    def stream_reads(self, root_id: int, account_id: int) -> tuple[str, ...]:
        """The hashes a balance stream's read depends on: the account's status, remaining
        amounts, balance definitions and overage (declared to Redis: a change wakes it)."""
        tag = self.tag(root_id)
        return tuple(f"{tag}:{kind}:{account_id}" for kind in "abdo")

    def journal_index(self, shard: int) -> str:
        return f"{self.prefix}:{{jx:{shard}}}:roots"

    def journal_index_of(self, root_id: int) -> str:
        return self.journal_index(root_id % JOURNAL_INDEX_SHARDS)

    @property
    def journal_pattern(self) -> str:
        return self.prefix + ":{*}:j"

    @property
    def root_pattern(self) -> str:
        """The root keys of every loaded root (not the journal index's `:roots`)."""
        return self.prefix + ":{*}:root"


def root_of(key: str) -> int:
    """The root id inside a key's hash tag."""
    return int(key[key.index("{") + 1 : key.index("}")])
