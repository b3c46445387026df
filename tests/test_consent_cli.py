"""``tb consent`` as a user runs it, against a running ``tb api``."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cli.credentials import auth_headers
from cli.nats_server import wait_for_port
from tests.api_client import ADMIN_PASSWORD, admin_key
from tests.conftest import NatsServer, free_port
from tests.sites import recording_site
from tests.test_cli import Console

TB = [sys.executable, "-m", "cli.main"]


def test_the_cli_sends_an_api_key_else_a_bearer_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TB_API_KEY", raising=False)
    monkeypatch.delenv("TB_API_TOKEN", raising=False)
    assert auth_headers() == {}
    monkeypatch.setenv("TB_API_TOKEN", "session-1")
    assert auth_headers() == {"Authorization": "Bearer session-1"}
    monkeypatch.setenv("TB_API_KEY", "key-1")
    assert auth_headers() == {"X-API-Key": "key-1"}


@pytest.fixture
async def api_url(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[str]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *TB, "api", "--nats-url", nats_server.url, "--port", str(port),
        "--db", str(tmp_path / "read.db"),
        env={**os.environ, "TB_CONSENT_MAX_SESSIONS": "5", "TB_ADMIN_PASSWORD": ADMIN_PASSWORD},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    console = Console(proc)
    try:
        await console.wait_for("API and dashboard on", timeout=30)
        url = f"http://127.0.0.1:{port}"
        await wait_for_port("127.0.0.1", port, timeout=20)
        monkeypatch.setenv("TB_API_KEY", (await admin_key(url))["X-API-Key"])
        yield url
    finally:
        proc.terminate()
        await console.finish(timeout=15)


async def tb_consent(api: str, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *TB, "consent", "--api", api, *args,
        env=dict(os.environ),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode()


@pytest.mark.slow
async def test_claim_verify_list_recheck_and_revoke_through_the_cli(api_url: str) -> None:
    code, out = await tb_consent(api_url, "claim", "127.0.0.1", "--max-sessions", "6")
    assert code == 1 and "caps.max_concurrent" in out and "TB_CONSENT_MAX_SESSIONS" in out
    code, out = await tb_consent(api_url, "claim", "127.0.0.1", "--max-sessions", "3")
    assert code == 0 and "publish this token" in out, out
    token = out.splitlines()[1].strip()
    with recording_site(token=token) as site:
        code, out = await tb_consent(api_url, "verify", "127.0.0.1", "--base-url", site.base_url)
        assert code == 0 and "verified 127.0.0.1 by well-known" in out, out
        assert "caps 3 sessions" in out
        assert all(h.get("x-api-key") is None for _, h in site.requests)  # only to the API
        site.token = None
        code, out = await tb_consent(api_url, "recheck", "127.0.0.1")
    assert code == 0 and "token absent" in out and "consent revoked" in out, out
    seq = out.rsplit("(seq ", 1)[1].rstrip(")\n")
    code, out = await tb_consent(api_url, "list", "--min-seq", seq)
    assert code == 0 and "127.0.0.1" in out and "revoked" in out and "token removed" in out, out
    code, out = await tb_consent(api_url, "revoke", "127.0.0.1")
    assert code == 1 and "already revoked" in out, out
