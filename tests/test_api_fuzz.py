"""Schemathesis against the running system: the API served on loopback with the engine
(dispatcher) and a runner live on a real nats-server. Every operation, 20 examples each of
valid and of invalid input: never a 5xx, never an answer its OpenAPI document does not
describe (status code, content type, headers, body schema), and the system is still
ready afterwards."""

from __future__ import annotations

import asyncio
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from agents.executor import NoopExecutor
from agents.runner import Runner
from api.app import create_app
from api.services import ApiConfig
from cli.nats_server import wait_for_port
from engine.bus import Bus
from tests.api_client import TEST_IDENTITY, admin_key, when_registered
from tests.conftest import NatsServer, free_port
from tests.harness import embedded

EXAMPLES = 20
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def fuzz(base_url: str, headers: dict[str, str]) -> dict[str, Counter[int]]:
    """Run every operation of the served OpenAPI document; returns its status codes."""
    schema = schemathesis.openapi.from_url(f"{base_url}/schema/openapi.json", timeout=10)
    seen: dict[str, Counter[int]] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        codes = seen.setdefault(operation.label, Counter())
        strategies = [operation.as_strategy(GenerationMode.POSITIVE)]
        if operation.path_parameters or operation.query or operation.headers or operation.body:
            strategies.append(operation.as_strategy(GenerationMode.NEGATIVE))
        for strategy in strategies:

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=strategy)
            def call(case: schemathesis.Case) -> None:
                response = case.call(base_url=base_url, headers=headers, timeout=15)
                codes[response.status_code] += 1  # noqa: B023
                assert response.status_code < 500, (
                    f"{case.as_curl_command()} answered {response.status_code}: {response.text}"
                )
                case.validate_response(response, checks=CHECKS)

            call()
    return seen


def get_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.slow  # ~60 s: 20 examples of valid and of invalid input per operation
async def test_fuzzing_every_operation_of_the_running_system_never_answers_5xx(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    config = ApiConfig(
        identity=TEST_IDENTITY,
        nats_url=nats_server.url,
        db_path=tmp_path / "api.db",
        read_wait_timeout=0.5,
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(config), host="127.0.0.1", port=port, log_level="warning")
    )
    async with embedded(bus, nats_server.url, tmp_path) as tb:
        await tb.authorise("127.0.0.1")
        registered = asyncio.Event()
        tb.run(
            Runner(bus, NoopExecutor(), slots=4, announce=when_registered(registered)).run(),
            "runner",
        )
        serving = asyncio.create_task(server.serve())
        try:
            async with asyncio.timeout(30):
                await registered.wait()
                await wait_for_port("127.0.0.1", port)
            base = f"http://127.0.0.1:{port}"
            assert await asyncio.to_thread(get_status, f"{base}/readyz") == 200
            seen = await asyncio.to_thread(fuzz, base, await admin_key(base))
            assert await asyncio.to_thread(get_status, f"{base}/readyz") == 200
            assert all(not task.done() for task in tb.tasks)  # engine and runner still up
        finally:
            server.should_exit = True
            await serving
    print({label: dict(codes) for label, codes in sorted(seen.items())})
    assert len(seen) >= 15, sorted(seen)
    assert all(codes for codes in seen.values()), seen
