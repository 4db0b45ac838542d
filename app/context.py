"""The clients and caches one app process shares between requests and workers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import asyncpg
from redis.asyncio import Redis

from app.config.catalog import Catalog
from app.hotstate.store import HotState
from app.http import KeyCache
from app.ledger.journal import Journal
from app.ledger.loader import Loader
from app.ledger.verifier import HotCheck
from app.observe import Observed
from app.settings import Settings

if TYPE_CHECKING:
    from app.purchases.stripe_gateway import StripeGateway
    from app.webhooks.dispatcher import Dispatcher


@dataclass
class AppContext:
    settings: Settings
    pool: asyncpg.Pool
    redis: Redis
    hot: HotState
    catalog: Catalog
    keys: KeyCache
    journal: Journal
    loader: Loader
    stripe: StripeGateway | None = None  # None: no STRIPE_API_KEY, no purchases
    dispatcher: Dispatcher | None = None  # this process's webhook dispatcher (GET /metrics)
    observed: Observed | None = None  # what this app counts (GET /metrics; None: not counting)
    hot_check: HotCheck = field(default_factory=HotCheck)  # the workers' sampled check
    # set when the process begins to stop: long-lived answers (balance streams) end
    closing: asyncio.Event = field(default_factory=asyncio.Event)
