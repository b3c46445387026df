"""HTTP hygiene: CORS for the listed origins only, the security headers on every answer
(routes, errors, pages, the refused WebSocket upgrade), the JSON body limit named in its
413, and no internals in a 500."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import structlog
import uvicorn
from litestar import get
from litestar.routes import HTTPRoute
from litestar.testing import AsyncTestClient

from api.app import create_app
from api.authz import access
from api.hygiene import HttpPolicy
from api.services import ApiConfig
from cli.nats_server import wait_for_port
from tests.api_client import (
    ADMIN_PASSWORD,
    JOB,
    Online,
    admin_key,
    api_config,
    client,
    runner_online,
)
from tests.conftest import NatsServer, free_port

__all__ = ["client", "runner_online"]  # fixtures

ALLOWED = "https://dashboard.example.com"
OTHER = "https://evil.example.net"
SECURITY = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


def config(nats_server: NatsServer, tmp_path: Path, **kwargs: object) -> ApiConfig:
    return api_config(nats_server, tmp_path, **kwargs)


@pytest.fixture
async def cors_client(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[AsyncTestClient]:
    policy = HttpPolicy(allowed_origins=(ALLOWED,), hsts=True)
    async with AsyncTestClient(app=create_app(config(nats_server, tmp_path, http=policy))) as c:
        yield c


def assert_secured(headers: object, *, api: bool = True) -> None:
    got = {k: headers.get(k) for k in SECURITY}  # type: ignore[attr-defined]
    assert got == SECURITY, got
    csp = headers.get("content-security-policy", "")  # type: ignore[attr-defined]
    assert "frame-ancestors 'none'" in csp, csp
    if api:
        assert headers.get("cache-control") == "no-store"  # type: ignore[attr-defined]


async def test_a_listed_origin_gets_cors_headers_and_another_origin_none(
    cors_client: AsyncTestClient,
) -> None:
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    ok = await cors_client.options("/api/v1/jobs", headers={"Origin": ALLOWED, **preflight})
    assert ok.status_code == 204
    assert ok.headers["access-control-allow-origin"] == ALLOWED
    assert ok.headers["access-control-allow-credentials"] == "true"
    assert "POST" in ok.headers["access-control-allow-methods"]
    simple = await cors_client.get("/healthz", headers={"Origin": ALLOWED})
    assert simple.status_code == 200
    assert simple.headers["access-control-allow-origin"] == ALLOWED
    assert simple.headers["access-control-allow-credentials"] == "true"
    exposed = set(simple.headers["access-control-expose-headers"].split(", "))
    assert {"TB-Next-Cursor", "Link", "Retry-After"} <= exposed  # paging, throttling

    refused = await cors_client.options("/api/v1/jobs", headers={"Origin": OTHER, **preflight})
    assert refused.status_code == 400
    assert "access-control-allow-origin" not in refused.headers
    assert "access-control-allow-credentials" not in refused.headers
    other = await cors_client.get("/healthz", headers={"Origin": OTHER})
    assert other.status_code == 200  # answered, but the browser keeps it from the page
    assert "access-control-allow-origin" not in other.headers
    assert "access-control-allow-credentials" not in other.headers
    for answer in (ok, simple, refused, other):
        assert_secured(answer.headers)
        assert answer.headers["strict-transport-security"].startswith("max-age=")


async def test_without_listed_origins_no_answer_carries_cors_headers(
    client: AsyncTestClient,
) -> None:
    answer = await client.get("/healthz", headers={"Origin": ALLOWED})
    assert answer.status_code == 200
    assert not [k for k in answer.headers if k.lower().startswith("access-control-")]
    assert "strict-transport-security" not in answer.headers  # TB_HSTS unset


async def test_every_route_family_and_error_carries_the_security_headers(
    client: AsyncTestClient,
) -> None:
    answers = {
        "no route": await client.get("/no/such/route"),
        "bad input": await client.post("/api/v1/jobs", json={"name": 1}),
        "ingest refused": await client.post(
            "/api/v1/logs", json={"job_id": "x", "message": "m"}, headers={"X-API-Key": "k"}
        ),
    }
    # every route of the table (those added later too), each method, with made-up path
    # values and an empty body: answers and refusals alike
    for route in client.app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        path = re.sub(r"\{[^}]+\}", "x_nope", route.path)
        for method in sorted(set(route.methods) - {"OPTIONS", "HEAD"}):
            body = {} if method in ("POST", "PUT", "PATCH") else None
            async with asyncio.timeout(10):
                answers[f"{method} {route.path}"] = await client.request(method, path, json=body)
    assert len(answers) > 40
    for family, answer in answers.items():
        assert answer.status_code < 500 or family == "GET /readyz", (family, answer.text)
        assert_secured(answer.headers)
        if "html" not in answer.headers.get("content-type", ""):
            assert answer.headers["content-security-policy"].startswith("default-src 'none'")

    page = await client.get("/")
    assert_secured(page.headers)
    csp = page.headers["content-security-policy"]
    assert "script-src 'sha256-" in csp and "style-src 'sha256-" in csp
    assert "connect-src 'self'" in csp and "unsafe-inline" not in csp
    docs = await client.get("/schema")
    assert_secured(docs.headers)
    assert "https://cdn.redoc.ly" in docs.headers["content-security-policy"]


async def test_an_unexpected_exception_is_a_500_with_an_id_and_the_trace_only_in_the_log(
    client: AsyncTestClient,
) -> None:
    @get("/api/v1/boom", sync_to_thread=False, opt=access("public"))
    def boom() -> None:
        raise RuntimeError("nats://admin:hunter2@10.0.0.1 said no in line 42")

    client.app.register(boom)
    with structlog.testing.capture_logs() as logs:
        answer = await client.get("/api/v1/boom")
    assert answer.status_code == 500
    body = answer.json()
    assert body["detail"].startswith("internal error ") and body["detail"].endswith("API log")
    error_id = body["detail"].split()[2].rstrip(";")
    for leak in ("Traceback", "RuntimeError", "hunter2", "line 42", "boom"):
        assert leak not in answer.text
    assert_secured(answer.headers)
    logged = [line for line in logs if line.get("error_id") == error_id]
    assert logged and logged[0]["exc_info"].args[0].startswith("nats://admin")


async def test_a_json_body_over_the_limit_is_a_413_naming_the_limit(
    client: AsyncTestClient,
) -> None:
    big = {"domain": "a" * 40_000 + ".example"}
    answer = await client.post("/api/v1/consents", json=big)
    assert answer.status_code == 413
    body = answer.json()
    assert body["field"] == "body"
    assert body["detail"] == "body: larger than the limit of 32 KiB (32768 bytes)"
    assert_secured(answer.headers)


def upgrade(port: int, origin: str | None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13",
        }
        if origin:
            headers["Origin"] = origin
        conn.request("GET", "/ws", headers=headers)
        response = conn.getresponse()
        body = response.read() if response.status != 101 else b""
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        conn.close()


async def test_a_websocket_from_another_origin_is_refused_with_the_headers(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    port = free_port()
    policy = HttpPolicy(allowed_origins=(ALLOWED,))
    app = create_app(config(nats_server, tmp_path, http=policy))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    try:
        await wait_for_port("127.0.0.1", port, timeout=20)
        status, headers, body = await asyncio.to_thread(upgrade, port, OTHER)
        assert status == 403
        assert json.loads(body)["detail"] == f"origin {OTHER} may not open a WebSocket here"
        assert_secured(headers)
        for origin in (ALLOWED, f"http://127.0.0.1:{port}", None):  # listed, own page, no browser
            status, headers, body = await asyncio.to_thread(upgrade, port, origin)
            assert b"may not open a WebSocket" not in body, origin
            assert status == 101, (origin, body)  # until a login is asked for first
            assert headers["x-content-type-options"] == "nosniff"
    finally:
        server.should_exit = True
        await serving


async def test_the_dashboard_runs_under_its_csp_in_chromium(
    nats_server: NatsServer, tmp_path: Path, runner_online: Online
) -> None:
    from playwright.async_api import ConsoleMessage, async_playwright

    from agents.browser import launch_chromium

    port = free_port()
    app = create_app(config(nats_server, tmp_path))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    violations: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            violations.append(message.text)

    try:
        await wait_for_port("127.0.0.1", port, timeout=20)
        await runner_online()  # once the app has made the presence bucket
        async with async_playwright() as pw:
            browser = await launch_chromium(pw)
            try:
                page = await browser.new_page()
                page.on(
                    "console", lambda m: violations.append(m.text) if "Policy" in m.text else None
                )
                page.on("pageerror", lambda err: violations.append(str(err)))
                base_url = f"http://127.0.0.1:{port}"
                # made before the page logs in: making it logs in, which would end that session
                headers = await admin_key(base_url)
                await page.goto(f"{base_url}/")
                await page.fill("#login input[name=username]", "admin")
                await page.fill("#login input[name=password]", ADMIN_PASSWORD)
                await page.click("#login button")
                await page.locator("#conn", has_text="live").wait_for()
                async with httpx.AsyncClient(base_url=base_url, headers=headers) as http:
                    created = await http.post("/api/v1/jobs", json=JOB)
                    assert created.status_code == 201, created.text
                job_id = created.json()["job_id"]
                row = page.locator("#jobs tbody tr", has_text=job_id)
                await row.locator("progress.bar").wait_for(timeout=15_000)
                # inline script and style ran (by hash): the table is styled and filled
                collapse = await page.evaluate(
                    "getComputedStyle(document.querySelector('table')).borderCollapse"
                )
                assert collapse == "collapse"
            finally:
                await browser.close()
    finally:
        server.should_exit = True
        await serving
    assert violations == []
