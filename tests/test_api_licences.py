"""Licences through HTTP: a plan without a feature gets 403 naming it and the plan, and
nothing is stored; the catalogue; assigning plans to users."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from litestar.testing import AsyncTestClient

from engine.bus import Bus
from engine.identity.users import user_id_for
from schemas import subjects
from schemas.events import JobRefused, JobStarted, LicenseAssigned, UserCreated
from schemas.ids import new_id, utcnow
from schemas.licences import DEFAULT_PLAN, PLANS
from tests.api_client import JOB, Online, client, runner_online
from tests.conftest import NatsServer
from tests.harness import embedded, start_outcomes

__all__ = ["client", "runner_online"]  # fixtures

CALLER = user_id_for("admin")  # the test client logs in as the first admin


async def append_user_event(nats_server: NatsServer, event: UserCreated | LicenseAssigned) -> int:
    async with await Bus.connect(nats_server.url, name="test-users") as bus:
        return (await bus.append(event, msg_id=new_id())).seq


async def assign(
    client: AsyncTestClient, nats_server: NatsServer, plan: str, user_id: str = CALLER
) -> None:
    """Put ``user_id`` on ``plan`` as the log records it, and wait until the API's read
    model has it."""
    event = LicenseAssigned(id=new_id(), at=utcnow(), actor="test", user_id=user_id, plan=plan)
    seq = await append_user_event(nats_server, event)
    assert (await client.get(f"/api/v1/jobs?limit=1&min_seq={seq}")).status_code == 200


async def create_user(nats_server: NatsServer, user_id: str) -> None:
    event = UserCreated(
        id=new_id(), at=utcnow(), actor="test", user_id=user_id, username=user_id, role="operator"
    )
    await append_user_event(nats_server, event)


async def stored(nats_server: NatsServer, stream_filter: str) -> list[object]:
    async with await Bus.connect(nats_server.url, name="test-read") as bus:
        return [env.event for env in await bus.load(stream_filter)]


async def crawler_key(client: AsyncTestClient) -> dict[str, str]:
    """The crawler routes act for the user whose API key they are given."""
    made = await client.post("/api/v1/api-keys", json={"name": "crawler"})
    return {"X-API-Key": made.json()["key"]}


def job(**settings: Any) -> dict[str, Any]:
    return {**JOB, "settings": {**JOB["settings"], "human_surfing": False, **settings}}  # type: ignore[dict-item]


# -- refusals ------------------------------------------------------------------------------


async def test_a_plan_without_human_surfing_gets_403_naming_it_and_nothing_is_stored(
    client: AsyncTestClient, runner_online: Online, nats_server: NatsServer
) -> None:
    await runner_online()
    await assign(client, nats_server, "trial")
    answer = await client.post("/api/v1/jobs", json=job(human_surfing=True))
    assert answer.status_code == 403, answer.text
    problem = answer.json()
    assert problem["field"] == "settings.human_surfing"
    assert problem["detail"] == (
        "settings.human_surfing: licence: plan 'trial' does not include human_surfing"
    )
    assert await stored(nats_server, subjects.all_jobs()) == []
    allowed = await client.post("/api/v1/jobs", json=job())
    assert allowed.status_code == 201, allowed.text


async def test_each_limit_gets_403_naming_the_limit_and_the_plan(
    client: AsyncTestClient, runner_online: Online, nats_server: NatsServer
) -> None:
    await runner_online()
    await assign(client, nats_server, "trial")
    too_many = {**job(), "targets": [{"url": "http://127.0.0.1:9/", "flows": 51}]}
    devices = [{"name": "Pixel 7"}, {"name": "iPad Mini"}]
    for body, field, rule in [
        (job(instance_count=3), "settings.instance_count", "instance_count 3 exceeds"),
        (too_many, "targets", "flows_per_job 51 exceeds"),
        (job(devices=devices), "settings.devices", "platforms 2 exceeds"),
        (job(proxy_switching=True), "settings.proxy_switching", "include proxy_switching"),
        (job(external_click_ratio=0.5), "settings.external_click_ratio", "external_clicks"),
    ]:
        answer = await client.post("/api/v1/jobs", json=body)
        assert answer.status_code == 403, (field, answer.text)
        assert answer.json()["field"] == field and rule in answer.json()["rule"]
        assert "plan 'trial'" in answer.json()["rule"]
    assert await stored(nats_server, subjects.all_jobs()) == []


async def test_running_jobs_count_towards_concurrent_jobs_external_ones_too(
    client: AsyncTestClient, runner_online: Online, nats_server: NatsServer
) -> None:
    await runner_online()
    await assign(client, nats_server, "trial")
    as_caller = await crawler_key(client)
    first = await client.post("/api/crawler/start", json={"name": "worker"}, headers=as_caller)
    assert first.status_code == 200, first.text
    await client.get(f"/api/v1/jobs?limit=1&min_seq={first.json()['seq']}")
    again = await client.post("/api/crawler/start", json={"name": "worker"}, headers=as_caller)
    flows = await client.post("/api/v1/jobs", json=job())
    for answer in (again, flows):
        assert answer.status_code == 403, answer.text
        assert answer.json()["field"] == "concurrent_jobs"
        assert "concurrent_jobs 2 exceeds the limit of 1 of plan 'trial'" in answer.text
    cancelled = await client.post(f"/api/crawler/cancel/{first.json()['job_id']}")
    await client.get(f"/api/v1/jobs?limit=1&min_seq={cancelled.json()['seq']}")
    assert (await client.post("/api/v1/jobs", json=job())).status_code == 201


async def test_a_retried_create_answers_its_job_though_that_job_now_counts(
    client: AsyncTestClient, runner_online: Online, nats_server: NatsServer
) -> None:
    await runner_online()
    await assign(client, nats_server, "trial")
    as_caller = await crawler_key(client)
    key = {"Idempotency-Key": "start-1", **as_caller}
    first = await client.post("/api/crawler/start", json={}, headers=key)
    await client.get(f"/api/v1/jobs?limit=1&min_seq={first.json()['seq']}")  # it runs
    retried = await client.post("/api/crawler/start", json={}, headers=key)
    assert retried.status_code == 200 and retried.json() == first.json()
    other_key = {"Idempotency-Key": "s-2", **as_caller}
    other = await client.post("/api/crawler/start", json={}, headers=other_key)
    assert other.status_code == 403 and other.json()["field"] == "concurrent_jobs"


async def test_proxy_import_needs_a_plan_with_it(
    client: AsyncTestClient, nats_server: NatsServer
) -> None:
    await assign(client, nats_server, "standard")
    answer = await client.post("/api/v1/proxies", json={"url": "http://u:secret@10.0.0.1:3128"})
    assert answer.status_code == 403, answer.text
    assert answer.json()["rule"] == "licence: plan 'standard' does not include proxy_import"
    assert "secret" not in answer.text
    assert await stored(nats_server, "tb.proxy.>") == []
    await assign(client, nats_server, "enterprise")
    assert (
        await client.post("/api/v1/proxies", json={"url": "http://10.0.0.1:3128"})
    ).status_code == 201


async def test_without_an_assigned_plan_the_default_plan_rules(
    client: AsyncTestClient, runner_online: Online
) -> None:
    await runner_online()
    assert DEFAULT_PLAN == "enterprise"  # a self-hosted installation runs everything
    answer = await client.post("/api/v1/jobs", json=job(human_surfing=True, instance_count=50))
    assert answer.status_code == 201, answer.text


async def test_what_gets_past_a_lagging_read_model_meets_the_plan_in_the_engine(
    client: AsyncTestClient, runner_online: Online, nats_server: NatsServer, bus: Bus,
    tmp_path: Path,
) -> None:  # fmt: skip
    engine_dir = tmp_path / "engine"
    engine_dir.mkdir()
    async with embedded(bus, nats_server.url, engine_dir) as tb:
        await tb.authorise("127.0.0.1")  # no runner takes the work: a started job runs on
        await runner_online()
        # the API may not have read this yet when the creates arrive
        await bus.append(
            LicenseAssigned(id=new_id(), at=utcnow(), actor="t", user_id=CALLER, plan="trial"),
            msg_id=new_id(),
        )
        bodies = [job(), job(), job(), job(human_surfing=True)]
        answers = await asyncio.gather(*(client.post("/api/v1/jobs", json=b) for b in bodies))
        accepted = [a.json()["job_id"] for a in answers if a.status_code == 201]
        assert {a.status_code for a in answers} <= {201, 403}
        ends = await start_outcomes(bus, accepted)
    started = [e for e in ends if isinstance(e, JobStarted)]
    # the API let through plain jobs it saw none running of; the engine ran one at a time
    assert len(started) == 1
    assert all(e.reason.startswith("licence: ") for e in ends if isinstance(e, JobRefused))
    assert not [e for e in started if e.job_id == answers[3].json().get("job_id")]


# -- the admin endpoints -------------------------------------------------------------------


async def test_the_catalogue_lists_every_plan_with_its_matrix(client: AsyncTestClient) -> None:
    answer = await client.get("/api/v1/licences")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["default_plan"] == DEFAULT_PLAN
    assert [p["plan"] for p in body["plans"]] == list(PLANS)
    trial = body["plans"][0]
    assert trial["features"]["human_surfing"] is False
    assert trial["limits"]["concurrent_jobs"] == 1
    assert body["plans"][2]["limits"]["instance_count"] is None


async def test_assigning_a_plan_stores_it_once_per_command_and_the_api_applies_it(
    client: AsyncTestClient, runner_online: Online, nats_server: NatsServer
) -> None:
    await runner_online()
    key = {"Idempotency-Key": "assign-1"}
    url = f"/api/v1/users/{CALLER}/licence"
    first = await client.put(url, json={"plan": "trial"}, headers=key)
    again = await client.put(url, json={"plan": "trial"}, headers=key)
    assert first.status_code == 200, first.text
    assert again.json() == first.json()
    assert first.json() == {"user_id": CALLER, "plan": "trial", "seq": first.json()["seq"]}
    other = await client.put(url, json={"plan": "standard"}, headers=key)
    assert other.status_code == 409 and other.json()["field"] == "Idempotency-Key"
    events = await stored(nats_server, subjects.user_stream_filter(CALLER))
    assert [type(e).__name__ for e in events if isinstance(e, LicenseAssigned)] == [
        "LicenseAssigned"
    ]
    await client.get(f"/api/v1/jobs?limit=1&min_seq={first.json()['seq']}")
    refused = await client.post("/api/v1/jobs", json=job(human_surfing=True))
    assert refused.status_code == 403 and "plan 'trial'" in refused.text


async def test_concurrent_assignments_all_land_one_after_another(
    client: AsyncTestClient, nats_server: NatsServer
) -> None:
    await create_user(nats_server, "ann")
    plans = ["trial", "standard", "enterprise"] * 2
    answers = await asyncio.gather(
        *(client.put("/api/v1/users/ann/licence", json={"plan": plan}) for plan in plans)
    )
    assert [a.status_code for a in answers] == [200] * len(plans)
    assert len({a.json()["seq"] for a in answers}) == len(plans)
    events = await stored(nats_server, subjects.user_stream_filter("ann"))
    assert len([e for e in events if isinstance(e, LicenseAssigned)]) == len(plans)


async def test_bad_assignments_name_the_field_and_store_nothing(
    client: AsyncTestClient, nats_server: NatsServer
) -> None:
    unknown = await client.put("/api/v1/users/ann/licence", json={"plan": "gold"})
    assert unknown.status_code == 400 and unknown.json()["field"] == "plan"
    assert unknown.json()["rule"] == "must be one of trial, standard, enterprise (got 'gold')"
    nobody = await client.put("/api/v1/users/ann/licence", json={"plan": "trial"})
    assert nobody.status_code == 404 and nobody.json()["field"] == "user_id"
    bad_id = await client.put("/api/v1/users/a.b/licence", json={"plan": "trial"})
    assert bad_id.status_code == 400 and bad_id.json()["field"] == "user_id"
    extra = await client.put("/api/v1/users/ann/licence", json={"plan": "trial", "x": 1})
    assert extra.status_code == 400
    assert [
        e for e in await stored(nats_server, "tb.user.>") if isinstance(e, LicenseAssigned)
    ] == []
