"""Customer tokens for the end customer's browser (app/auth/tokens.py), and the audit trail of
the keys' writes (app/audit.py)."""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, Field

from app import audit
from app.auth.tokens import DEFAULT_TTL_S, MAX_TTL_S, MIN_TTL_S
from app.http import ADMIN, READ, Call, Endpoint
from app.ledger.service import account_ref
from app.schemas import Integer, Strict, decode_cursor, next_cursor


class CustomerTokenIn(Strict):
    ttl_s: Integer = Field(default=DEFAULT_TTL_S, ge=MIN_TTL_S, le=MAX_TTL_S,
                           description="seconds the token is good for")


class CustomerTokenOut(BaseModel):
    token: str = Field(description="`Authorization: Bearer <token>` on the customer routes of "
                       "this account only; shown once, never stored")
    account: str
    expires_at: datetime


async def mint(call: Call) -> BaseModel:
    code = call.path("code")
    await account_ref(call.ctx, code, field="code")
    assert call.principal is not None
    token, expires = await call.ctx.keys.tokens.mint(call.ctx.pool, call.principal.key_id, code,
                                                     call.body.ttl_s)
    return CustomerTokenOut(token=token, account=code,
                            expires_at=datetime.fromtimestamp(expires, UTC))


async def audit_log(call: Call) -> BaseModel:
    q: audit.AuditQuery = call.query
    rows = await audit.entries(call.ctx.pool, decode_cursor(q.cursor), q.limit, q.key_id)
    return audit.AuditPage(data=[audit.entry_out(r) for r in rows],
                           next_cursor=next_cursor([r["id"] for r in rows], q.limit))


ENDPOINTS = [
    Endpoint("GET", "/v1/audit-log", audit_log, ADMIN,
             "Every write to the configuration surface, newest first: key, route, body sent, "
             "status", "audit", query=audit.AuditQuery, response=audit.AuditPage),
    Endpoint("POST", "/v1/accounts/{code}/customer-tokens", mint, READ,
             "A short-lived token with which the account's own customer reads its balances, "
             "bill-to-date and bills (for a browser)", "customer tokens",
             body=CustomerTokenIn, response=CustomerTokenOut, status=201, secret_answer=True),
]
