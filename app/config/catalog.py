"""In-process cache of configuration the hot path needs, so `check` never waits on Postgres.

Codes, parents and decimal places never change once created, so those entries live forever.
An account's default credit type can change: it is re-read after ACCOUNT_TTL_S, and at once in
the process that changed it. Status and balances are not cached here; they live in Redis.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import asyncpg

from app.config import repository as repo

ACCOUNT_TTL_S = 10.0


@dataclass(frozen=True)
class CreditTypeRef:
    id: int
    code: str
    kind: str
    decimal_places: int


@dataclass(frozen=True)
class AccountRef:
    id: int
    code: str
    root_id: int
    chain: tuple[int, ...]
    credit_type: CreditTypeRef | None

    @functools.cached_property
    def chain_arg(self) -> str:  # (cached in the instance's __dict__: fields stay frozen)
        return ",".join(map(str, self.chain))


class Catalog:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._accounts: dict[str, tuple[AccountRef, float]] = {}
        self._types: dict[str, CreditTypeRef] = {}
        self._types_by_id: dict[int, CreditTypeRef] = {}
        self._products: set[str] = set()

    def cached_account(self, code: str) -> AccountRef | None:
        """The account when it is cached and fresh (no coroutine: the hot path's common case);
        None means "ask `account`"."""
        hit = self._accounts.get(code)
        return hit[0] if hit and hit[1] > time.monotonic() else None

    def known_product(self, code: str) -> bool:
        """True when the product is known to exist (False means "ask `product_exists`")."""
        return code in self._products

    async def account(self, code: str) -> AccountRef | None:
        cached = self.cached_account(code)
        if cached is not None:
            return cached
        row = await repo.account_by_code(self.pool, code)
        if row is None:
            return None
        chain = await repo.account_chain(self.pool, row["id"])
        type_id = await repo.inherited_credit_type(self.pool, chain)
        ref = AccountRef(row["id"], code, row["root_id"], tuple(chain),
                         await self.credit_type_by_id(type_id) if type_id else None)
        self._accounts[code] = (ref, time.monotonic() + ACCOUNT_TTL_S)
        return ref

    def forget_accounts(self) -> None:
        self._accounts.clear()

    def _remember_type(self, row: asyncpg.Record) -> CreditTypeRef:
        ref = CreditTypeRef(row["id"], row["code"], row["kind"], row["decimal_places"])
        self._types[ref.code] = ref
        self._types_by_id[ref.id] = ref
        return ref

    async def credit_type(self, code: str) -> CreditTypeRef | None:
        if code in self._types:
            return self._types[code]
        row = await repo.credit_type_by_code(self.pool, code)
        return self._remember_type(row) if row else None

    async def credit_type_by_id(self, type_id: int) -> CreditTypeRef:
        if type_id in self._types_by_id:
            return self._types_by_id[type_id]
        row = await repo.credit_type_by_id(self.pool, type_id)
        assert row is not None, f"credit type {type_id} vanished"
        return self._remember_type(row)

    async def product_exists(self, code: str) -> bool:
        if code in self._products:
            return True
        if await repo.product_by_code(self.pool, code) is None:
            return False
        self._products.add(code)
        return True
