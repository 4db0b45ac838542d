"""`Idempotency-Key` on admin writes.

The same key with the same request replays the stored response; with another request it is a
422; while the first request still runs, a 409. A request abandoned by a dead process releases
its key after LOCK_TIMEOUT. Keys are remembered for `idempotency_key_ttl_h` hours at least, then
deleted by the workers (`purge_expired`); the same key after that is a new request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING

from starlette.responses import Response

from app.auth.keys import Principal
from app.errors import IdempotencyInProgress, IdempotencyMismatch, ValidationProblem

if TYPE_CHECKING:
    from app.context import AppContext

LOCK_TIMEOUT = timedelta(seconds=60)  # asyncpg binds an interval from a timedelta only
MAX_KEY_LENGTH = 255
PURGE_BATCH = 1000


async def _claim(ctx: AppContext, principal: Principal, key: str, fingerprint: bytes) -> bool:
    """Take the key for this request; False when it is already taken."""
    row = await ctx.pool.fetchrow(
        """INSERT INTO idempotency_keys (api_key_id, key, request_hash) VALUES ($1, $2, $3)
           ON CONFLICT (api_key_id, key) DO UPDATE SET locked_at = now()
               WHERE idempotency_keys.status_code IS NULL
                 AND idempotency_keys.request_hash = EXCLUDED.request_hash
                 AND idempotency_keys.locked_at < now() - $4::interval
           RETURNING 1""",
        principal.key_id, key, fingerprint, LOCK_TIMEOUT,
    )
    return row is not None


async def run_idempotent(
    ctx: AppContext,
    principal: Principal,
    key: str,
    fingerprint: bytes,
    run: Callable[[], Awaitable[Response]],
) -> Response:
    if not key or len(key) > MAX_KEY_LENGTH:
        raise ValidationProblem(f"must be 1 to {MAX_KEY_LENGTH} characters", field="Idempotency-Key")
    if not await _claim(ctx, principal, key, fingerprint):
        return await _replay(ctx, principal, key, fingerprint)
    try:
        response = await run()
    except BaseException:
        await ctx.pool.execute(
            "DELETE FROM idempotency_keys WHERE api_key_id = $1 AND key = $2 AND status_code IS NULL",
            principal.key_id, key,
        )
        raise
    if response.status_code >= 500:
        # not a result worth replaying: let the client retry for real
        await ctx.pool.execute(
            "DELETE FROM idempotency_keys WHERE api_key_id = $1 AND key = $2", principal.key_id, key
        )
        return response
    await ctx.pool.execute(
        """UPDATE idempotency_keys SET status_code = $3, response_body = $4
           WHERE api_key_id = $1 AND key = $2""",
        principal.key_id, key, response.status_code, bytes(response.body),
    )
    return response


async def _replay(ctx: AppContext, principal: Principal, key: str, fingerprint: bytes) -> Response:
    row = await ctx.pool.fetchrow(
        """SELECT request_hash, status_code, response_body FROM idempotency_keys
           WHERE api_key_id = $1 AND key = $2""",
        principal.key_id, key,
    )
    if row is None:  # released between our claim and this read: a retry is safe
        raise IdempotencyInProgress("retry the request", field="Idempotency-Key")
    if bytes(row["request_hash"]) != fingerprint:
        raise IdempotencyMismatch(
            "this key was used with a different request body or route", field="Idempotency-Key"
        )
    if row["status_code"] is None:
        raise IdempotencyInProgress("the first request with this key has not finished",
                                    field="Idempotency-Key")
    media = "application/json" if row["status_code"] < 400 else "application/problem+json"
    return Response(bytes(row["response_body"]), status_code=row["status_code"], media_type=media,
                    headers={"Idempotent-Replayed": "true"})


async def purge_expired(ctx: AppContext) -> int:
    """Worker: delete keys older than the TTL, oldest first, at most PURGE_BATCH per pass (a
    backlog goes in later passes); how many went."""
    hours = ctx.settings.idempotency_key_ttl_h
    if hours <= 0:
        return 0
    deleted = await ctx.pool.fetchval(
        """WITH old AS (SELECT api_key_id, key FROM idempotency_keys
                        WHERE created_at < now() - $1::interval ORDER BY created_at LIMIT $2)
           , gone AS (DELETE FROM idempotency_keys i USING old
                      WHERE i.api_key_id = old.api_key_id AND i.key = old.key RETURNING 1)
           SELECT count(*) FROM gone""",
        timedelta(hours=hours), PURGE_BATCH)
    return int(deleted)
