"""Logs are JSON lines for machines and never carry a secret: not under a secret-named
key, not inside a URL, not as a bearer token, not as a secret setting's value found in
some message; proven on the redaction itself and on real ``tb api`` and ``tb engine``
processes given secrets in their environment and their NATS URL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

import httpx
import pytest
import structlog

from cli.log_redaction import (
    MASK,
    RedactText,
    is_secret_name,
    redact_by_key,
    secret_values_from_env,
)
from cli.nats_server import wait_for_port
from tests.conftest import NatsServer, free_port

pytestmark = pytest.mark.timeout(60)

TB = [sys.executable, "-m", "cli.main"]
NATS_PASSWORD = "nats-pass-8f3k2"
SECRETS = {
    "TB_INGEST_API_KEY": "ingest-key-4d9a0c7e1b2f3a5d",
    "TB_ADMIN_PASSWORD": "admin-pass-77c1e0a9d3",
    "JWT_SECRET": "jwt-secret-0b8e2f4c6a1d",
}
BEARER = "eyJhbGciOiJIUzI1NiJ9.tok3n-p4rt"


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("password", True),
        ("api_key", True),
        ("X-API-Key", True),
        ("Authorization", True),
        ("Set-Cookie", True),
        ("session_token", True),
        ("runnerKey", True),
        ("JWT_SECRET", True),
        ("key", True),
        ("key_id", False),
        ("job_id", False),
        ("keys_seen", False),
        ("monkey", False),
        ("event", False),
    ],
)
def test_secret_names(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret


def test_values_are_masked_by_key_then_the_line_by_what_it_says() -> None:
    redact = RedactText(known=[SECRETS["JWT_SECRET"], 'with "quotes" \\ in it'])
    event = {
        "event": "request",
        "password": "hunter2",
        "key_id": "key_01",
        "headers": {"Authorization": "Bearer abc", "Accept": "json"},
        "urls": ["nats://tb:s3cr3t@10.0.0.1:4222", "http://token123@proxy:8080/x"],
        "note": f"sent Bearer {BEARER} and {SECRETS['JWT_SECRET']!r} in a repr",
        "quoted": 'a secret with "quotes" \\ in it',
        "plain": "https://example.com/path?q=1",
    }
    keyed = redact_by_key(None, "info", event)
    assert keyed["password"] == MASK and keyed["key_id"] == "key_01"
    assert keyed["headers"] == {"Authorization": MASK, "Accept": "json"}
    line = json.loads(redact(None, "info", json.dumps(keyed)))
    assert line["urls"] == ["nats://tb:***@10.0.0.1:4222", "http://***@proxy:8080/x"]
    assert BEARER not in line["note"] and SECRETS["JWT_SECRET"] not in line["note"]
    assert line["quoted"] == "a secret ***"
    assert line["plain"] == "https://example.com/path?q=1"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("Authorization: Basic dXNlcjpwYXNz sent", "Authorization: *** sent"),
        ("{'authorization': 'Bearer abc.def'}", "{'authorization': '***'}"),
        ("got Bearer eyJhbGciOi.x-y_z", "got Bearer ***"),
        ("nats://tb:pa/ss+w==@h:4222", "nats://tb:***@h:4222"),
        ("redis://:s3cret-only@cache:6379/0", "redis://:***@cache:6379/0"),
        ("Basic authentication failed; Bearer authentication next", None),
        ("https://medium.com/topic and user@example.com", None),
    ],
)
def test_credentials_in_free_text(text: str, shown: str | None) -> None:
    assert RedactText().text(text) == (shown or text)


def test_the_secrets_known_from_the_environment() -> None:
    env = {
        **SECRETS,
        "TB_CORS_CREDENTIALS": "disabled",  # a switch, not a secret
        "PASSWORD_STORE_DIR": "/home/tb/.password-store",  # where secrets are, no secret
        "PWD": "/home/tb",
        "TB_NATS_URL": f"nats://tb:{NATS_PASSWORD}@h:4222",
        "HOME": "/root",
    }
    assert sorted(secret_values_from_env(env)) == sorted([*SECRETS.values(), NATS_PASSWORD])


def assert_no_secret(output: str) -> None:
    for secret in (NATS_PASSWORD, BEARER, *SECRETS.values()):
        assert secret not in output, f"{secret!r} leaked:\n{output}"


def json_lines(output: str) -> list[dict[str, object]]:
    """The log lines (milestone lines for people, e.g. "✅ …", are plain text)."""
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


async def run_until_stopped(proc: asyncio.subprocess.Process) -> str:
    proc.send_signal(signal.SIGTERM)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return (out + err).decode()


async def test_a_real_tb_api_logs_json_without_the_secrets_it_was_given(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    port = free_port()
    url = nats_server.url.replace("nats://", f"nats://tb:{NATS_PASSWORD}@")
    env = {k: v for k, v in os.environ.items() if k != "TB_LOG_FORMAT"}
    env |= {**SECRETS, "TB_LOG_LEVEL": "debug"}
    proc = await asyncio.create_subprocess_exec(
        *TB, "api", "--nats-url", url, "--port", str(port), "--db", str(tmp_path / "read.db"),
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await wait_for_port("127.0.0.1", port, timeout=30)
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            ready = await http.get("/readyz")
            assert ready.status_code in (200, 503) and "server" not in ready.headers
            line = {"job_id": "job_1", "message": "hello"}
            wrong = await http.post(
                "/api/v1/logs",
                json=line,
                headers={"X-API-Key": "wrong", "Authorization": f"Bearer {BEARER}"},
            )
            assert wrong.status_code == 403
            right = {"X-API-Key": SECRETS["TB_INGEST_API_KEY"]}
            assert (await http.post("/api/v1/logs", json=line, headers=right)).status_code < 500
            assert (await http.get(f"/api/v1/jobs?token={BEARER}")).status_code < 500
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            raw.sendall(b"NOT HTTP AT ALL\r\n\r\n")  # uvicorn's own logger complains
            raw.recv(1024)
    finally:
        output = await run_until_stopped(proc)
    assert_no_secret(output)
    lines = json_lines(output)
    assert {"projector.started"} <= {str(line["event"]) for line in lines}, output
    assert any(str(line.get("logger", "")).startswith("uvicorn") for line in lines), output
    assert str(tmp_path / "read.db") in output  # ordinary values are left alone


async def test_a_real_tb_engine_names_its_nats_url_without_the_password(
    nats_server: NatsServer,
) -> None:
    url = nats_server.url.replace("nats://", f"nats://tb:{NATS_PASSWORD}@")
    env = {**os.environ, **SECRETS, "TB_LOG_FORMAT": "json"}
    proc = await asyncio.create_subprocess_exec(
        *TB, "engine", "--nats-url", url,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    seen = b""
    async with asyncio.timeout(30):
        while b"Engine running" not in seen:
            seen += await proc.stderr.readline()
    output = seen.decode() + await run_until_stopped(proc)
    assert_no_secret(output)
    assert "nats://tb:***@127.0.0.1" in output


def test_an_unknown_log_format_is_refused_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cli.logs import _renderer

    monkeypatch.setenv("TB_LOG_FORMAT", "xml")
    with pytest.raises(SystemExit, match=r"^TB_LOG_FORMAT: must be json or console"):
        _renderer()
    monkeypatch.setenv("TB_LOG_FORMAT", "JSON")
    assert isinstance(_renderer(), structlog.processors.JSONRenderer)
