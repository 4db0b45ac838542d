"""The workers' pass: one failing step does not stop the steps after it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from app.workers import Step, run_pass
from tests.conftest import Api


async def test_a_step_that_fails_is_logged_and_the_next_runs_but_a_store_error_ends_the_pass(
        caplog: pytest.LogCaptureFixture) -> None:
    ran: list[str] = []

    def step(name: str, error: BaseException | None = None) -> Step:
        async def run() -> None:
            ran.append(name)
            if error is not None:
                raise error
        return name, run

    await run_pass([step("a", RuntimeError("a row it cannot handle")), step("b"),
                    step("c", ConnectionRefusedError()), step("d")])
    assert ran == ["a", "b", "c"]  # (a refused connection is a store error: d would fail too)
    assert "worker step a failed" in caplog.text and "skipped at c" in caplog.text


async def test_expiry_runs_while_an_earlier_step_fails_every_pass(
        api: Api, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    """The session's own workers, with the recurring-grants step (before expiry) broken."""
    failures = 0

    async def broken(ctx: Any) -> None:
        nonlocal failures
        failures += 1
        raise RuntimeError("a recurring grant it cannot handle")

    monkeypatch.setattr("app.workers.grant_recurring", broken)
    n = await api.setup()
    soon = datetime.now(UTC) + timedelta(milliseconds=300)
    grant = await api.grant(n["account"], "4.00", expires_at=soon.isoformat())
    row = None
    for _ in range(100):
        row = await db.fetchrow("SELECT amount FROM ledger_entries WHERE balance_id = $1 AND "
                                "kind = 'expire'", grant["id"])
        if row:
            break
        await asyncio.sleep(0.1)
    assert row is not None and str(row["amount"]) == "-4.00"
    assert failures >= 1
