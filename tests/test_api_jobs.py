"""Job commands through HTTP: idempotent creates, validated URLs, pause and resume with a
real engine and runner."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

from agents.runner import Runner
from api.app import create_app
from api.services import ApiConfig
from engine.bus import Bus
from schemas import subjects
from schemas.events import FlowDispatched, JobCreated
from tests.api_client import (
    JOB,
    TEST_IDENTITY,
    Online,
    client,
    log_in,
    runner_online,
    when_registered,
)
from tests.conftest import NatsServer
from tests.harness import Embedded, SteadyExecutor, embedded

__all__ = ["client", "runner_online"]  # fixtures

WAIT = 60.0


async def job_events(nats_server: NatsServer, job_id: str) -> list[object]:
    async with await Bus.connect(nats_server.url, name="test-read") as bus:
        return [env.event for env in await bus.load(subjects.job_stream_filter(job_id))]


async def all_job_created(nats_server: NatsServer) -> list[JobCreated]:
    async with await Bus.connect(nats_server.url, name="test-read") as bus:
        envelopes = await bus.load(subjects.all_jobs("JobCreated"))
    return [env.event for env in envelopes if isinstance(env.event, JobCreated)]


# -- Idempotency-Key -----------------------------------------------------------------------


async def test_a_create_retried_with_its_key_answers_the_same_job_and_stores_one(
    client: AsyncTestClient, runner_online: Online, nats_server: NatsServer
) -> None:
    await runner_online()
    key = {"Idempotency-Key": "create-0001"}
    first = await client.post("/api/v1/jobs", json=JOB, headers=key)
    retried = await asyncio.gather(
        *(client.post("/api/v1/jobs", json=JOB, headers=key) for _ in range(5))
    )
    assert first.status_code == 201, first.text
    assert {(r.status_code, r.json()["job_id"], r.json()["seq"]) for r in retried} == {
        (201, first.json()["job_id"], first.json()["seq"])
    }
    created = await all_job_created(nats_server)
    assert [e.job_id for e in created] == [first.json()["job_id"]]
    view = await client.get(f"/api/v1/jobs/{first.json()['job_id']}?min_seq={first.json()['seq']}")
    assert view.status_code == 200 and view.json()["name"] == JOB["name"]


async def test_creates_with_different_keys_make_different_jobs(
    client: AsyncTestClient, runner_online: Online, nats_server: NatsServer
) -> None:
    await runner_online()
    answers = [
        await client.post("/api/v1/jobs", json=JOB, headers={"Idempotency-Key": key})
        for key in ("a-1", "a-2")
    ] + [await client.post("/api/v1/jobs", json=JOB) for _ in range(2)]  # no key: new each
    assert {r.status_code for r in answers} == {201}
    ids = {r.json()["job_id"] for r in answers}
    assert len(ids) == 4
    assert {e.job_id for e in await all_job_created(nats_server)} == ids


async def test_a_cancel_retried_with_its_key_answers_the_stored_seq(
    client: AsyncTestClient, runner_online: Online, nats_server: NatsServer
) -> None:
    await runner_online()
    job_id = (await client.post("/api/v1/jobs", json=JOB)).json()["job_id"]
    key = {"Idempotency-Key": "cancel-1"}
    first = await client.post(f"/api/v1/jobs/{job_id}/cancel", headers=key)
    again = await client.post(f"/api/v1/jobs/{job_id}/cancel", headers=key)
    assert (first.status_code, again.status_code) == (202, 202)
    assert again.json()["seq"] == first.json()["seq"]
    kinds = [type(e).__name__ for e in await job_events(nats_server, job_id)]
    assert kinds.count("JobCancelled") == 1


async def test_a_key_that_names_another_command_is_409_and_stores_nothing(
    client: AsyncTestClient, runner_online: Online, nats_server: NatsServer
) -> None:
    """Found by fuzzing: a key reused for another aggregate was answered with a 500."""
    await runner_online()
    key = {"Idempotency-Key": "k-1"}
    claim = await client.post("/api/v1/consents", json={"domain": "a.test"}, headers=key)
    assert claim.status_code == 201, claim.text
    job_id = (await client.post("/api/v1/jobs", json=JOB)).json()["job_id"]
    for method, url, body in [
        ("POST", "/api/v1/consents", {"domain": "b.test"}),
        ("POST", "/api/v1/jobs", JOB),
        ("POST", f"/api/v1/jobs/{job_id}/cancel", None),
    ]:
        r = await client.request(method, url, json=body, headers=key)
        assert r.status_code == 409, (url, r.text)
        assert r.json()["field"] == "Idempotency-Key"
    cancel = {"Idempotency-Key": "k-2"}
    assert (await client.post(f"/api/v1/jobs/{job_id}/cancel", headers=cancel)).status_code == 202
    reused = await client.post(f"/api/v1/jobs/{job_id}/pause", headers=cancel)
    assert reused.status_code == 409 and "JobCancelled" in reused.json()["rule"]
    kinds = [type(e).__name__ for e in await job_events(nats_server, job_id)]
    assert kinds == ["JobCreated", "JobCancelled"]


@pytest.mark.parametrize("key", ["", "has space", "x" * 129, "a/b", "k\xe9y"])
async def test_a_malformed_idempotency_key_is_400_naming_the_header(
    client: AsyncTestClient, runner_online: Online, nats_server: NatsServer, key: str
) -> None:
    await runner_online()
    headers = {"Idempotency-Key": key.encode("latin-1")}  # as a client may send it
    r = await client.post("/api/v1/jobs", json=JOB, headers=headers)
    assert r.status_code == 400, r.text
    assert r.json()["field"] == "Idempotency-Key"
    assert await all_job_created(nats_server) == []


# -- URLs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "rule"),
    [
        ("http://[::1/", "not a valid URL"),
        ("http://127.0.0.1:99999/", "not a valid URL"),
        ("http://127.0.0.1:abc/", "not a valid URL"),
        ("http://a b.test/", "spaces"),
        ("http://exa_mple.test/", "neither a domain name nor an IP address"),
    ],
)
async def test_a_target_url_that_does_not_parse_is_400_naming_the_field(
    client: AsyncTestClient, runner_online: Online, nats_server: NatsServer, url: str, rule: str
) -> None:
    await runner_online()
    body = {**JOB, "targets": [{"url": "http://127.0.0.1:9/"}, {"url": url}]}
    r = await client.post("/api/v1/jobs", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["field"] == "targets[1].url"
    assert rule in r.json()["rule"]
    assert await all_job_created(nats_server) == []


# -- pause and resume, with the engine and a runner ------------------------------------------


@pytest.fixture
async def live(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> AsyncIterator[tuple[Embedded, AsyncTestClient]]:
    """The API app, the dispatcher and a runner of steady flows, on one nats-server."""
    app = create_app(
        ApiConfig(identity=TEST_IDENTITY, nats_url=nats_server.url, db_path=tmp_path / "api.db")
    )
    async with embedded(bus, nats_server.url, tmp_path) as tb:
        await tb.authorise("127.0.0.1")
        registered = asyncio.Event()
        runner = Runner(bus, SteadyExecutor(0.05), slots=2, announce=when_registered(registered))
        tb.run(runner.run(), "runner")
        async with asyncio.timeout(WAIT):
            await registered.wait()
        async with AsyncTestClient(app=app) as c:
            await log_in(c)
            yield tb, c


def job_body(name: str, flows: int, host: str = "127.0.0.1") -> dict[str, object]:
    return {
        "name": name,
        "targets": [{"url": f"http://{host}:9/", "flows": flows, "clicks": 1}],
        "settings": {"instance_count": 2, "session_seconds": 0},
    }


async def test_a_paused_job_gets_no_new_work_and_resumes_to_exact_counts(
    live: tuple[Embedded, AsyncTestClient], bus: Bus
) -> None:
    tb, client = live
    created = await client.post("/api/v1/jobs", json=job_body("paused", 30))
    assert created.status_code == 201, created.text
    job_id = created.json()["job_id"]
    await tb.wait_job(job_id, lambda v: v.flows_done >= 4, timeout=WAIT)

    paused = await client.post(f"/api/v1/jobs/{job_id}/pause", json={"reason": "lunch"})
    assert paused.status_code == 202, paused.text
    assert paused.json()["status"] == "paused"
    view = (await client.get(f"/api/v1/jobs/{job_id}?min_seq={paused.json()['seq']}")).json()
    assert (view["status"], view["reason"]) == ("paused", "lunch")
    again = await client.post(f"/api/v1/jobs/{job_id}/pause")
    assert again.status_code == 409 and "paused" in again.json()["rule"]

    # a second job runs to its end while the first one waits: the dispatcher saw the pause
    # before it planned the second job (it reads the log in order), and from then on gave
    # the paused job nothing new; what it had handed out before finishes
    other = await client.post("/api/v1/jobs", json=job_body("meanwhile", 6))
    other_id = other.json()["job_id"]
    await tb.wait_terminal(other_id, timeout=WAIT)
    work = [
        e.event
        for e in await bus.load(subjects.ALL_DISPATCH)
        if isinstance(e.event, FlowDispatched)
    ]
    first_other = next(i for i, e in enumerate(work) if e.job_id == other_id)
    assert all(e.job_id != job_id for e in work[first_other:])
    handed_out = sum(e.job_id == job_id for e in work)
    settled = await tb.wait_job(job_id, lambda v: v.flows_done >= handed_out, WAIT)
    assert settled.status == "paused" and settled.flows_done == handed_out < 30

    resumed = await client.post(f"/api/v1/jobs/{job_id}/resume")
    assert resumed.status_code == 202, resumed.text
    final = await tb.wait_terminal(job_id, timeout=WAIT)
    assert (final.status, final.flows_done, final.flows_failed) == ("completed", 30, 0)
    assert final.targets[0].click_done == 30

    late = await client.post(f"/api/v1/jobs/{job_id}/pause")
    assert late.status_code == 409
    assert late.json()["field"] == "status" and "completed" in late.json()["rule"]
    running = await client.post(f"/api/v1/jobs/{job_id}/resume")
    assert running.status_code == 409 and "completed" in running.json()["rule"]


async def test_resume_is_refused_naming_a_host_without_valid_consent(
    live: tuple[Embedded, AsyncTestClient],
) -> None:
    tb, client = live
    created = await client.post("/api/v1/jobs", json=job_body("revoked", 200))
    job_id = created.json()["job_id"]
    await tb.wait_job(job_id, lambda v: v.status == "running", timeout=WAIT)
    paused = await client.post(f"/api/v1/jobs/{job_id}/pause")
    assert paused.status_code == 202, paused.text
    revoked = await client.post("/api/v1/consents/127.0.0.1/revoke", json={"reason": "test"})
    assert revoked.status_code == 202, revoked.text
    refused = await client.post(f"/api/v1/jobs/{job_id}/resume")
    assert refused.status_code == 409, refused.text
    assert "127.0.0.1" in refused.json()["detail"]
    view = await client.get(f"/api/v1/jobs/{job_id}?min_seq={revoked.json()['seq']}")
    assert view.json()["status"] == "paused"
