"""Errors that carry their HTTP status; one handler renders them as RFC 9457 problem+json."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import asyncpg
import redis.exceptions
from starlette.responses import Response

log = logging.getLogger(__name__)
T = TypeVar("T")
PROBLEM_TYPE_BASE = "https://creditgate.dev/problems/"


class Problem(Exception):
    """A request that cannot be served, with the status, a stable code and the failing field."""

    status = 400
    code = "bad_request"
    title = "Bad request"

    def __init__(
        self, detail: str, *, field: str | None = None, errors: list[dict[str, Any]] | None = None
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field
        self.errors = errors

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": PROBLEM_TYPE_BASE + self.code,
            "title": self.title,
            "status": self.status,
            "code": self.code,
            "detail": self.detail,
        }
        if self.field is not None:
            body["field"] = self.field
        if self.errors:
            body["errors"] = self.errors
        return body


class ValidationProblem(Problem):
    status = 422
    code = "validation_error"
    title = "Invalid request"


class MalformedBody(Problem):
    status = 400
    code = "malformed_body"
    title = "Malformed request body"


class BodyTooLarge(Problem):
    status = 413
    code = "body_too_large"
    title = "Request body too large"


class Unauthenticated(Problem):
    status = 401
    code = "unauthenticated"
    title = "Missing or unknown API key"


class Forbidden(Problem):
    status = 403
    code = "forbidden"
    title = "API key scope does not allow this route"


class NotFound(Problem):
    status = 404
    code = "not_found"
    title = "Not found"


class Conflict(Problem):
    status = 409
    code = "conflict"
    title = "Conflict"


class IdempotencyInProgress(Conflict):
    code = "idempotency_in_progress"
    title = "A request with this Idempotency-Key is still running"


class IdempotencyMismatch(ValidationProblem):
    code = "idempotency_key_reused"
    title = "Idempotency-Key reused with a different request"


class Unavailable(Problem):
    status = 503
    code = "unavailable"
    title = "Service cannot decide right now"


def internal_error() -> Problem:
    """What a bug is answered with: no detail beyond that it was logged."""
    problem = Problem("an internal error occurred; it has been logged")
    problem.status, problem.code, problem.title = 500, "internal_error", "Internal error"
    return problem


def problem_response(problem: Problem) -> Response:
    headers = {"Retry-After": "1"} if problem.status == 503 else None
    return Response(
        json.dumps(problem.body()),
        status_code=problem.status,
        media_type="application/problem+json",
        headers=headers,
    )


def field_path(loc: tuple[int | str, ...]) -> str:
    """Render a pydantic error location as a dotted path: ``events.3.amount``."""
    return ".".join(str(part) for part in loc) or "body"


# Failures that mean "the store cannot answer": the request gets a 503, never a guess.
STORE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
)


async def one_by_one(items: Iterable[T], work: Callable[[T], Awaitable[int | None]],
                     what: str) -> int:
    """A worker's `work` on each item in turn. One that fails for its own reason (a bug, a row
    it cannot handle) is logged and the others go on, so one bad row cannot hold up every row
    after it, pass after pass; a store error is raised (every later item would fail too).
    Returns the sum of what `work` returned (None: 0)."""
    done = 0
    for item in items:
        try:
            done += await work(item) or 0
        except STORE_ERRORS:
            raise
        except Exception:
            log.exception("%s failed for %r; the others go on", what, item)
    return done
