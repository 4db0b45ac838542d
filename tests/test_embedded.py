"""`creditgate serve` with no DATABASE_URL / REDIS_URL: the README's first command on a fresh
machine. The embedded Postgres and Redis start under the data folder, the migrations apply, the
first start prints an admin key once; a restart finds the same data (and prints no key)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
import uuid
from pathlib import Path

import httpx

from tests.conftest import now_iso

CREDITGATE = str(Path(sys.executable).parent / "creditgate")
KEY = re.compile(r"\b(cg_admin_[A-Za-z0-9_\-]+)")
RUNTIME = re.compile(r"\b(cg_runtime_[A-Za-z0-9_\-]+)")
USAGE = {"uid": "first-use", "product": "api", "amount": "1.00"}
START_S = 180  # a first start runs initdb and every migration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _no_urls() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}


async def _serve(data_dir: Path, port: int) -> tuple[asyncio.subprocess.Process, list[str]]:
    """Start `creditgate serve`; return it once /readyz answers ready, with its output so far
    (read on in the background)."""
    proc = await asyncio.create_subprocess_exec(
        CREDITGATE, "serve", "--data-dir", str(data_dir), "--port", str(port), env=_no_urls(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        start_new_session=True)
    lines: list[str] = []

    async def read() -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            lines.append(line.decode(errors="replace"))

    asyncio.get_running_loop().create_task(read())
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        for _ in range(START_S * 4):
            if proc.returncode is not None:
                raise AssertionError("creditgate serve exited:\n" + "".join(lines))
            try:
                ready = await client.get("/readyz")
                if ready.status_code == 200 and ready.json()["ready"]:
                    return proc, lines
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.25)
    proc.kill()
    raise AssertionError("not ready in time:\n" + "".join(lines))


async def _stop(proc: asyncio.subprocess.Process) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), 60)
    except TimeoutError:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


async def test_serve_with_no_urls_runs_embedded_stores_and_survives_a_restart(
        tmp_path: Path) -> None:
    data_dir, port = tmp_path / "data", _free_port()
    proc, lines = await _serve(data_dir, port)
    try:
        output = "".join(lines)
        assert f"serving on http://127.0.0.1:{port}" in output, output
        assert "applied migration 001_core.sql" in output
        keys = KEY.findall(output)
        assert len(keys) == 1, output
        admin = {"Authorization": f"Bearer {keys[0]}"}
        code = f"acct-{uuid.uuid4().hex[:6]}"
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                     headers=admin) as client:
            for path, body in [
                    ("/v1/credit-types", {"code": "usd", "name": "US dollar", "kind": "fiat",
                                          "decimal_places": 2}),
                    ("/v1/products", {"code": "api", "name": "API"}),
                    ("/v1/accounts", {"code": code, "name": "Example", "credit_type": "usd"}),
                    (f"/v1/accounts/{code}/grants", {"amount": "5.00"})]:
                created = await client.post(path, json=body)
                assert created.status_code == 201, created.text
            # the CLI, run beside the server, finds its embedded servers through the data folder
            made = await asyncio.create_subprocess_exec(
                CREDITGATE, "keys", "create", "--scope", "runtime", "--data-dir", str(data_dir),
                env=_no_urls(), stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT)
            made_out = (await made.communicate())[0].decode()
            assert made.returncode == 0, made_out
            [runtime_key] = RUNTIME.findall(made_out)
            runtime = {"Authorization": f"Bearer {runtime_key}"}
            check = await client.post("/v1/check", headers=runtime, json={
                "account": code, "product": "api", "amount": "1.00"})
            assert check.json()["allowed"] is True, check.text
            used = await client.post("/v1/usage", headers=runtime,
                                     json=USAGE | {"account": code, "timestamp": now_iso()})
            assert used.status_code == 200 and used.json()["status"] == "accepted", used.text
    finally:
        await _stop(proc)
    assert proc.returncode == 0, "".join(lines)
    assert not any(data_dir.rglob("postmaster.pid")), "the embedded Postgres kept running"

    proc, lines = await _serve(data_dir, port)
    try:
        assert not KEY.findall("".join(lines)), "a restart must not make another admin key"
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                     headers=admin) as client:
            account = await client.get(f"/v1/accounts/{code}")
            assert account.status_code == 200, account.text
            live = await client.get(f"/v1/balances?account={code}")
            assert [b["remaining"] for b in live.json()["data"]] == ["4.00"]
            again = await client.post("/v1/usage", headers=runtime,
                                      json=USAGE | {"account": code, "timestamp": now_iso()})
            assert again.json()["status"] == "duplicate", again.text
            hot = await client.get(f"/v1/accounts/{code}/balances", headers=runtime)
            assert hot.json()["totals"][0]["available"] == "4.00", hot.text
    finally:
        await _stop(proc)
    assert proc.returncode == 0, "".join(lines)
