"""Every Redis key creditgate uses. All keys of a billing root share the hash tag `{<root id>}`;
the per-account keys below the root key are derived inside the Lua scripts (lib.lua)."""

from __future__ import annotations

PREFIX = "cg"
# `cg:{<root>}:root`  hash   {gen}: present while the root is loaded
# `cg:{<root>}:v`     string operation counter, bumped by every journalled change
# `cg:{<root>}:j`     stream journal of changes not yet committed to Postgres
# `cg:{<root>}:a:<account>` hash {st, par}
# `cg:{<root>}:b:<account>` hash balance id -> remaining (scaled integer)
# `cg:{<root>}:d:<account>` hash balance id -> definition "ct|priority|eff|exp|status|products"
# `cg:{<root>}:o:<account>` hash credit type -> overage (scaled integer)
# `cg:{<root>}:e:<account>` hash "product|ct" -> entitlement flag "1"/"0"
# `cg:{<root>}:u:<account>:<day>` hash of usage uids seen that day
JOURNAL_PATTERN = PREFIX + ":{*}:j"


def tag(root_id: int) -> str:
    return f"{PREFIX}:{{{root_id}}}"


def root_key(root_id: int) -> str:
    return f"{tag(root_id)}:root"


def journal_key(root_id: int) -> str:
    return f"{tag(root_id)}:j"


def root_of(key: str) -> int:
    """The root id inside a key's hash tag."""
    return int(key[key.index("{") + 1 : key.index("}")])
