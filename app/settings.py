"""Process settings, read once from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# how far apart the clocks of the app hosts and Postgres's may be: what reasons about times
# taken on different hosts leaves this much room (ledger rollups' marks, plan and pricing ends)
CLOCK_SLACK = timedelta(minutes=10)


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw else default


# A duration in seconds: the one kind of float the app uses (never an amount).
Seconds = float  # float-ok: the alias


def _seconds(name: str, default: Seconds) -> Seconds:
    raw = os.environ.get(name)
    return float(raw) if raw else default  # float-ok: a duration, not an amount


def _seconds_list(name: str, default: tuple[Seconds, ...]) -> tuple[Seconds, ...]:
    raw = os.environ.get(name)
    return tuple(float(part) for part in raw.split(",")) if raw else default  # float-ok: durations


# The longest a process may trust its copy of the customer-token signing secrets
# (app/auth/tokens.py): a plain rotation's grace for the older secrets counts on it.
TOKEN_SECRETS_TTL_MAX_S: Seconds = 300.0


def migrations_dir() -> Path:
    """`CREDITGATE_MIGRATIONS_DIR`, else the repository's `migrations/`."""
    configured = os.environ.get("CREDITGATE_MIGRATIONS_DIR")
    return Path(configured) if configured else REPO_ROOT / "migrations"


@dataclass(frozen=True)
class Settings:
    database_url: str
    redis_url: str
    migrations_dir: Path = field(default=REPO_ROOT / "migrations")
    db_pool_size: int = 10
    # Stripe (app/purchases/): without an API key this deployment takes no purchases.
    # STRIPE_API_BASE points the SDK elsewhere (a proxy; a fake in tests).
    stripe_api_key: str = ""
    stripe_webhook_secret: str = ""
    stripe_api_base: str = ""
    stripe_max_network_retries: int = 2
    stripe_timeout_s: Seconds = 30.0
    # Journal entries older than this are assumed orphaned by a dead process and re-flushed.
    journal_orphan_ms: int = 5_000
    # A journal flush of this many rows (usage events and ledger entries) or more is written by
    # COPY rather than one INSERT statement (0: never); see app/ledger/repository.py.
    journal_copy_rows: int = 200
    # How far a usage timestamp may lie in the future (clock skew) or in the past.
    usage_future_skew_s: int = 300
    usage_max_age_s: int = 35 * 24 * 3600
    # A usage timestamp at most this long before the request is drawn from the balances
    # eligible at the request's time, not its own (clock skew, timestamps cut to the second).
    usage_grace_ms: int = 5_000
    worker_interval_s: Seconds = 2.0
    # Each process compares one loaded root's hot copy with Postgres this often (0: never); see
    # app/ledger/verifier.py.
    verify_every_s: Seconds = 60.0
    # A balance (or an account's overage) with this many ledger entries after its snapshot gets
    # a new one from the workers (app/ledger/snapshots.py): what a hot-state rebuild reads.
    snapshot_every: int = 10_000
    # Admin Idempotency-Keys are remembered at least this long, then deleted (0: kept forever).
    idempotency_key_ttl_h: int = 7 * 24
    # Webhook events and their delivery log are kept this long once no delivery of them is
    # pending, then deleted by the workers (0: kept forever).
    webhook_retention_d: int = 30
    # days an audit-trail row is kept (app/audit.py); 0 keeps every row
    audit_retention_d: int = 0
    # days before its expiry a balance is announced by `credits.expiring` (0: never)
    expiry_notice_d: int = 7
    # The workers bill a period this many days after it ends (late measurements still rate
    # until then; after its bill they are stored unrated). Off: only `POST /v1/bills/run` bills.
    bills_auto: bool = True
    bill_grace_d: int = 1
    run_workers: bool = True
    redis_prefix: str = "cg"
    # Plain checks answered from the process's memory while Redis reports no change to what
    # they read (app/hotstate/checkcache.py); each answer is kept at most this long.
    check_cache: bool = True
    check_cache_ttl_ms: int = 30_000
    # Outbound webhooks (app/webhooks/). Link-local and cloud-metadata receivers are refused
    # unless allowed; loopback and private networks always are. Retries wait these seconds
    # after each failed attempt, then the delivery fails.
    webhooks_allow_private: bool = False
    webhooks_dispatch: bool = True
    webhooks_concurrency: int = 50
    webhooks_poll_s: Seconds = 1.0
    webhooks_retry_schedule_s: tuple[Seconds, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000)
    # Browser origins that may call the customer routes (customer tokens) across origins,
    # e.g. the vendor's web app; "*" for any. Empty: no CORS headers at all.
    cors_origins: tuple[str, ...] = ()
    # Each process re-reads the customer-token signing secrets at least this often, so a
    # secret retired by `creditgate tokens rotate-secret --retire-now` is refused everywhere
    # within it (a new secret is read as soon as a token names it). At most
    # TOKEN_SECRETS_TTL_MAX_S.
    token_secrets_ttl_s: Seconds = 30.0
    # Balance streams (app/entitlements/streams.py): how often each reads the hot state for a
    # change, how long one stays silent before a keep-alive comment, and how long one lasts
    # before the browser reconnects.
    stream_poll_ms: int = 500
    # and whether Redis's invalidations wake a stream at once on a change (the check cache's
    # subscriber; off: the polls alone)
    stream_push: bool = True
    stream_heartbeat_s: Seconds = 15.0
    stream_max_s: Seconds = 3600.0
    # GET /metrics: count each request by route and status, time it, and count the runtime
    # API's outcomes (app/observe.py); off, the scrape shows only what it reads itself
    request_metrics: bool = True
    # The largest request body read (bytes): a bigger one is refused 413 before it is read
    # whole (a 1,000-item batch is a few hundred KB)
    max_body_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1024:
            raise ValueError("CREDITGATE_MAX_BODY_BYTES must be at least 1024")
        if self.snapshot_every < 1:
            raise ValueError("CREDITGATE_SNAPSHOT_EVERY must be at least 1")
        if self.stream_poll_ms < 10:
            raise ValueError("CREDITGATE_STREAM_POLL_MS must be at least 10")
        if self.stream_max_s <= 0 or self.stream_heartbeat_s <= 0:
            raise ValueError("CREDITGATE_STREAM_MAX_S and CREDITGATE_STREAM_HEARTBEAT_S must "
                             "be more than 0")
        if not 0 <= self.token_secrets_ttl_s <= TOKEN_SECRETS_TTL_MAX_S:
            raise ValueError(f"CREDITGATE_TOKEN_SECRETS_TTL_S must be 0 to "
                             f"{TOKEN_SECRETS_TTL_MAX_S:g} seconds")

    @classmethod
    def from_env(cls) -> Settings:
        database_url = os.environ.get("DATABASE_URL", "")
        redis_url = os.environ.get("REDIS_URL", "")
        if not database_url or not redis_url:
            raise RuntimeError("DATABASE_URL and REDIS_URL must be set (or use `creditgate serve`)")
        return cls(
            database_url=database_url,
            redis_url=redis_url,
            migrations_dir=migrations_dir(),
            db_pool_size=_int("CREDITGATE_DB_POOL_SIZE", 10),
            stripe_api_key=os.environ.get("STRIPE_API_KEY", ""),
            stripe_webhook_secret=os.environ.get("STRIPE_WEBHOOK_SECRET", ""),
            stripe_api_base=os.environ.get("STRIPE_API_BASE", ""),
            stripe_max_network_retries=_int("STRIPE_MAX_NETWORK_RETRIES", 2),
            stripe_timeout_s=_seconds("STRIPE_TIMEOUT_S", 30.0),
            journal_orphan_ms=_int("CREDITGATE_JOURNAL_ORPHAN_MS", 5_000),
            journal_copy_rows=_int("CREDITGATE_JOURNAL_COPY_ROWS", 200),
            usage_grace_ms=_int("CREDITGATE_USAGE_GRACE_MS", 5_000),
            worker_interval_s=_seconds("CREDITGATE_WORKER_INTERVAL_S", 2.0),
            verify_every_s=_seconds("CREDITGATE_VERIFY_EVERY_S", 60.0),
            snapshot_every=_int("CREDITGATE_SNAPSHOT_EVERY", 10_000),
            idempotency_key_ttl_h=_int("CREDITGATE_IDEMPOTENCY_KEY_TTL_H", 7 * 24),
            webhook_retention_d=_int("CREDITGATE_WEBHOOK_RETENTION_D", 30),
            audit_retention_d=_int("CREDITGATE_AUDIT_RETENTION_D", 0),
            expiry_notice_d=_int("CREDITGATE_EXPIRY_NOTICE_D", 7),
            bills_auto=os.environ.get("CREDITGATE_BILLS_AUTO", "1") != "0",
            bill_grace_d=_int("CREDITGATE_BILL_GRACE_D", 1),
            run_workers=os.environ.get("CREDITGATE_WORKERS", "1") != "0",
            redis_prefix=os.environ.get("CREDITGATE_REDIS_PREFIX", "cg"),
            check_cache=os.environ.get("CREDITGATE_CHECK_CACHE", "1") != "0",
            check_cache_ttl_ms=_int("CREDITGATE_CHECK_CACHE_TTL_MS", 30_000),
            webhooks_allow_private=os.environ.get("CREDITGATE_WEBHOOKS_ALLOW_PRIVATE") == "1",
            webhooks_dispatch=os.environ.get("CREDITGATE_WEBHOOKS_DISPATCH", "1") != "0",
            webhooks_concurrency=_int("CREDITGATE_WEBHOOKS_CONCURRENCY", 50),
            webhooks_poll_s=_seconds("CREDITGATE_WEBHOOKS_POLL_S", 1.0),
            webhooks_retry_schedule_s=_seconds_list("CREDITGATE_WEBHOOKS_RETRY_SCHEDULE_S",
                                                    cls.webhooks_retry_schedule_s),
            cors_origins=tuple(o.strip().rstrip("/") for o in
                               os.environ.get("CREDITGATE_CORS_ORIGINS", "").split(",")
                               if o.strip()),
            token_secrets_ttl_s=_seconds("CREDITGATE_TOKEN_SECRETS_TTL_S", 30.0),
            stream_poll_ms=_int("CREDITGATE_STREAM_POLL_MS", 500),
            stream_push=os.environ.get("CREDITGATE_STREAM_PUSH", "1") != "0",
            stream_heartbeat_s=_seconds("CREDITGATE_STREAM_HEARTBEAT_S", 15.0),
            stream_max_s=_seconds("CREDITGATE_STREAM_MAX_S", 3600.0),
            request_metrics=os.environ.get("CREDITGATE_REQUEST_METRICS", "1") != "0",
            max_body_bytes=_int("CREDITGATE_MAX_BODY_BYTES", cls.max_body_bytes),
        )
