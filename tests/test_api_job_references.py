"""Jobs made from dataset references over HTTP, with a real nats-server: targets, devices
and a settings profile resolved at creation, who may use which dataset, and the exact
versions a job records."""

from __future__ import annotations

from typing import Any

from litestar.testing import AsyncTestClient

from engine.bus import Bus
from engine.proxies.secrets import ProxySecrets
from schemas import subjects
from schemas.events import FlowDispatched, JobCreated, decode_event
from tests.api_client import ClientAs, Online, client, client_as, runner_online
from tests.conftest import NatsServer
from tests.datasets import upload
from tests.harness import Embedded
from tests.test_api_datasets import raw_events
from tests.test_api_jobs import WAIT, live
from tests.test_api_licences import CALLER, assign, stored

__all__ = ["client", "client_as", "live", "runner_online"]  # fixtures

TARGETS_V1 = (
    b"URL,flowTarget,clickTarget,Source\nhttp://127.0.0.1:9/a,2,1,news\nhttp://127.0.0.1:9/b,,,\n"
)
TARGETS_V2 = b"URL,flowTarget\nhttp://127.0.0.1:9/c,7\n"
PROFILE = (
    b'{"name": "slow", "settings": {"instance_count": 3, "page_traffic": 2, "session_seconds": 0}}'
)
DEVICES = b'[{"name": "iPhone 13", "locale": "de-DE"}, {"name": "default"}]'


async def uploaded(
    client: AsyncTestClient, data: bytes, kind: str = "targets", fmt: str = "csv", **extra: Any
) -> dict[str, Any]:
    status, body = await upload(client, data, kind=kind, fmt=fmt, **extra)
    assert status == 201, body
    return body


async def created(client: AsyncTestClient, body: dict[str, Any]) -> dict[str, Any]:
    r = await client.post("/api/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    job: dict[str, Any] = (
        await client.get(f"/api/v1/jobs/{r.json()['job_id']}", params={"min_seq": r.json()["seq"]})
    ).json()
    return job


def ref(body: dict[str, Any], version: int | None = None) -> dict[str, Any]:
    return {"id": body["dataset_id"], "version": version or body["version"]}


async def test_a_job_from_a_targets_dataset_takes_its_rows_and_records_the_version(
    client: AsyncTestClient, runner_online: Online, nats_server: NatsServer
) -> None:
    await runner_online()
    targets = await uploaded(client, TARGETS_V1)
    job = await created(
        client,
        {"name": "from refs", "targets_dataset": ref(targets), "settings": {"session_seconds": 0}},
    )
    assert [(t["url"], t["flow_target"], t["click_target"]) for t in job["targets"]] == [
        ("http://127.0.0.1:9/a", 2, 2),  # click_target counts clicks over all its flows
        ("http://127.0.0.1:9/b", 1, 0),
    ]
    assert job["targets"][0]["label"] == "news"
    used = job["datasets"]["targets"]
    assert (used["id"], used["version"], len(used["sha256"])) == (targets["dataset_id"], 1, 64)
    [event] = [
        e
        for e in await stored(nats_server, subjects.job_stream_filter(job["job_id"]))
        if isinstance(e, JobCreated)
    ]
    assert event.datasets["targets"].sha256 == used["sha256"]


async def test_a_row_without_counts_takes_them_from_the_jobs_settings(
    client: AsyncTestClient, runner_online: Online
) -> None:
    await runner_online()
    targets = await uploaded(client, TARGETS_V1)
    job = await created(
        client,
        {
            "name": "defaults",
            "targets_dataset": ref(targets),
            "settings": {"session_seconds": 0, "target_flows": 5, "target_clicks": 2},
        },
    )
    assert [(t["flow_target"], t["click_target"]) for t in job["targets"]] == [(2, 2), (5, 10)]
    assert job["flows_total"] == 7


async def test_a_settings_profile_is_the_jobs_settings_and_inline_fields_override_it(
    client: AsyncTestClient, runner_online: Online, nats_server: NatsServer
) -> None:
    await runner_online()
    targets = await uploaded(client, TARGETS_V1)
    profile = await uploaded(client, PROFILE, kind="settings", fmt="json")
    devices = await uploaded(client, DEVICES, kind="devices", fmt="json")
    job = await created(
        client,
        {
            "name": "profiled",
            "targets_dataset": ref(targets),
            "settings_profile": ref(profile),
            "devices_dataset": ref(devices),
            "settings": {"priority": 4},
        },
    )
    assert (job["instance_count"], job["priority"]) == (3, 4)
    assert set(job["datasets"]) == {"targets", "settings", "devices"}
    [event] = [
        e
        for e in await stored(nats_server, subjects.job_stream_filter(job["job_id"]))
        if isinstance(e, JobCreated)
    ]
    assert event.settings.page_traffic == 2 and event.settings.priority == 4
    assert [(d.name, d.locale) for d in event.settings.devices] == [
        ("iPhone 13", "de-DE"),
        ("default", None),
    ]
    overridden = await created(
        client,
        {
            "name": "overridden",
            "targets_dataset": ref(targets),
            "settings_profile": ref(profile),
            "settings": {"instance_count": 1},
        },
    )
    assert overridden["instance_count"] == 1


async def test_targets_inline_or_by_reference_exactly_one(
    client: AsyncTestClient, runner_online: Online
) -> None:
    await runner_online()
    targets = await uploaded(client, TARGETS_V1)
    both = {
        "name": "both",
        "targets": [{"url": "http://127.0.0.1:9/"}],
        "targets_dataset": ref(targets),
    }
    for body in (both, {"name": "neither"}):
        r = await client.post("/api/v1/jobs", json=body)
        assert (r.status_code, r.json()["field"]) == (400, "targets"), r.text
        assert "targets_dataset" in r.json()["rule"], r.text


async def test_a_reference_names_the_field_when_kind_version_or_dataset_is_wrong(
    client: AsyncTestClient, runner_online: Online
) -> None:
    await runner_online()
    targets = await uploaded(client, TARGETS_V1)
    profile = await uploaded(client, PROFILE, kind="settings", fmt="json")
    cases = [
        ({"targets_dataset": ref(profile)}, 400, "targets_dataset.id"),
        (
            {"targets_dataset": ref(targets), "settings_profile": ref(targets)},
            400,
            "settings_profile.id",
        ),
        ({"targets_dataset": ref(targets, version=9)}, 404, "targets_dataset.version"),
        ({"targets_dataset": {"id": "ds_nothere", "version": 1}}, 404, "targets_dataset.id"),
        (
            {"targets_dataset": ref(targets), "proxies_dataset": ref(targets)},
            400,
            "proxies_dataset.id",
        ),
    ]
    for extra, status, field in cases:
        r = await client.post("/api/v1/jobs", json={"name": "bad", **extra})
        assert (r.status_code, r.json().get("field")) == (status, field), r.text
    assert (await client.get("/api/v1/jobs")).json() == []


async def test_another_users_dataset_is_404_until_shared_with_them(
    client: AsyncTestClient, client_as: ClientAs, runner_online: Online
) -> None:
    await runner_online()
    targets = await uploaded(client, TARGETS_V1)
    other = await client_as("operator")
    body = {"name": "theirs", "targets_dataset": ref(targets)}
    r = await other.post("/api/v1/jobs", json=body)
    assert (r.status_code, r.json()["field"]) == (404, "targets_dataset.id"), r.text
    me = (await other.get("/api/v1/auth/me")).json()
    shared = await client.put(f"/api/v1/datasets/{targets['dataset_id']}/shares/{me['user_id']}")
    assert shared.status_code in (200, 201, 202), shared.text
    r = await other.post("/api/v1/jobs", json=body)
    assert r.status_code == 201, r.text


async def test_the_licence_sees_the_resolved_settings_not_the_request(
    client: AsyncTestClient, runner_online: Online, nats_server: NatsServer
) -> None:
    await runner_online()
    targets = await uploaded(client, TARGETS_V1)
    profile = await uploaded(client, PROFILE, kind="settings", fmt="json")
    await assign(client, nats_server, "trial", CALLER)  # instance_count at most 2
    r = await client.post(
        "/api/v1/jobs",
        json={
            "name": "too wide",
            "targets_dataset": ref(targets),
            "settings_profile": ref(profile),
            "settings": {"human_surfing": False},
        },
    )
    assert r.status_code == 403, r.text
    assert r.json()["field"] == "settings.instance_count", r.text


async def test_a_running_job_unaffected_by_a_new_version_of_its_dataset(
    live: tuple[Embedded, AsyncTestClient], bus: Bus
) -> None:
    tb, client = live
    v1 = b"URL,flowTarget,clickTarget\nhttp://127.0.0.1:9/a,60,1\nhttp://127.0.0.1:9/b,,\n"
    first = await uploaded(client, v1, name="shop")
    r = await client.post(
        "/api/v1/jobs",
        json={
            "name": "from v1",
            "targets_dataset": ref(first),
            "settings": {"instance_count": 2, "session_seconds": 0},
        },
    )
    assert r.status_code == 201, r.text
    job_id = r.json()["job_id"]
    await tb.wait_job(job_id, lambda v: v.flows_done >= 2, timeout=WAIT)

    second = await uploaded(
        client, TARGETS_V2, dataset_id=first["dataset_id"], name="shop"
    )  # version 2 of the same dataset, while the job runs
    assert (second["dataset_id"], second["version"]) == (first["dataset_id"], 2)
    during = (await client.get(f"/api/v1/jobs/{job_id}", params={"min_seq": second["seq"]})).json()
    assert during["status"] == "running" and during["flows_done"] < 61, during

    final = await tb.wait_terminal(job_id, timeout=WAIT)
    assert (final.status, final.flows_done, final.flows_failed) == ("completed", 61, 0)
    view = (await client.get(f"/api/v1/jobs/{job_id}")).json()
    assert [(t["url"], t["flow_done"]) for t in view["targets"]] == [
        ("http://127.0.0.1:9/a", 60),
        ("http://127.0.0.1:9/b", 1),
    ]
    assert view["datasets"]["targets"]["version"] == 1
    urls = {
        e.event.url
        for e in await bus.load(subjects.ALL_DISPATCH)
        if isinstance(e.event, FlowDispatched) and e.event.job_id == job_id
    }
    assert urls == {"http://127.0.0.1:9/a", "http://127.0.0.1:9/b"}

    later = await created(client, {"name": "from v2", "targets_dataset": ref(second)})
    assert [t["url"] for t in later["targets"]] == ["http://127.0.0.1:9/c"]
    assert later["datasets"]["targets"]["version"] == 2


PROXIES = (
    b"scheme,host,port,username,password,enabled,bypass,dns\n"
    b"http,10.0.0.1,3128,alice,s3cret-pw-1,yes,Shop.Example; *.cdn.example,\n"
    b"socks5,10.0.0.2,1080,,,no,,\n"
    b"https,proxy.example,8443,bob,s3cret-pw-2,yes,,Proxy\n"
)


async def test_a_proxies_dataset_becomes_the_jobs_pool_registered_once_without_secrets_in_the_log(
    client: AsyncTestClient, runner_online: Online, nats_server: NatsServer, bus: Bus
) -> None:
    await runner_online()
    targets = await uploaded(client, TARGETS_V1)
    proxies = await uploaded(client, PROXIES, kind="proxies")
    body = {"name": "pooled", "targets_dataset": ref(targets), "proxies_dataset": ref(proxies)}
    pools = []
    for _ in range(2):
        r = await client.post("/api/v1/jobs", json=body)
        assert r.status_code == 201, r.text
        [event] = [
            e
            for e in await stored(nats_server, subjects.job_stream_filter(r.json()["job_id"]))
            if isinstance(e, JobCreated)
        ]
        assert event.settings.proxies is not None
        pools.append(event.settings.proxies.ids)
        assert event.datasets["proxies"].version == 1
    assert len(pools[0]) == 2 and pools[0] == pools[1]  # the disabled row is left out
    listed = (await client.get("/api/v1/proxies", params={"min_seq": r.json()["seq"]})).json()
    assert [
        (p["proxy_id"], p["host"], p["has_credentials"], p.get("bypass"), p.get("dns"))
        for p in listed
    ] == [
        (pools[0][0], "10.0.0.1", True, ["shop.example", "*.cdn.example"], None),
        (pools[0][1], "proxy.example", True, None, "proxy"),
    ]
    # the runner reads them with the endpoint, by the id the work item names
    secrets = ProxySecrets(bus)
    first, second = [await secrets.get(pid) for pid in pools[0]]
    assert first is not None and first.bypass == ("shop.example", "*.cdn.example")
    assert second is not None and (second.dns, second.password) == ("proxy", "s3cret-pw-2")
    raw = await raw_events(bus)
    assert b"s3cret-pw" not in raw and b"alice" not in raw


async def test_a_proxies_dataset_needs_proxy_import_an_enabled_row_and_one_pool(
    client: AsyncTestClient, runner_online: Online, nats_server: NatsServer
) -> None:
    await runner_online()
    targets = await uploaded(client, TARGETS_V1)
    disabled = await uploaded(
        client, b"scheme,host,port,enabled\nhttp,10.0.0.1,3128,no\n", kind="proxies"
    )
    r = await client.post(
        "/api/v1/jobs",
        json={"name": "x", "targets_dataset": ref(targets), "proxies_dataset": ref(disabled)},
    )
    assert (r.status_code, r.json()["field"]) == (422, "proxies_dataset"), r.text
    assert r.json()["rule"] == "the version has no enabled proxy"
    bypassing = await uploaded(
        client, b"scheme,host,port,bypass\nhttp,10.0.0.1,3128,a.example\n", kind="proxies"
    )
    both = {
        "name": "x",
        "targets_dataset": ref(targets),
        "proxies_dataset": ref(bypassing),
        "settings": {"proxies": {"label": "eu"}},
    }
    r = await client.post("/api/v1/jobs", json=both)
    assert (r.status_code, r.json()["field"]) == (400, "proxies_dataset"), r.text
    plain = await uploaded(client, b"scheme,host,port\nhttp,10.0.0.3,3128\n", kind="proxies")
    await assign(client, nats_server, "standard", CALLER)  # proxies, but no proxy import
    r = await client.post(
        "/api/v1/jobs",
        json={"name": "x", "targets_dataset": ref(targets), "proxies_dataset": ref(plain)},
    )
    assert (r.status_code, r.json()["field"]) == (403, "proxies_dataset"), r.text
    assert (await client.get("/api/v1/proxies")).json() == []


async def test_a_targets_version_too_large_for_one_job_is_422_naming_the_field(
    client: AsyncTestClient, runner_online: Online
) -> None:
    await runner_online()
    path = "x" * 200
    rows = "".join(f"http://127.0.0.1:9/{n}/{path}\n" for n in range(5000))
    big = await uploaded(client, rows.encode(), fmt="txt")
    r = await client.post("/api/v1/jobs", json={"name": "big", "targets_dataset": ref(big)})
    assert (r.status_code, r.json()["field"]) == (422, "targets_dataset"), r.text
    assert (await client.get("/api/v1/jobs")).json() == []


async def test_devices_are_named_once(client: AsyncTestClient, runner_online: Online) -> None:
    await runner_online()
    targets = await uploaded(client, TARGETS_V1)
    devices = await uploaded(client, DEVICES, kind="devices", fmt="json")
    body = {
        "name": "twice",
        "targets_dataset": ref(targets),
        "devices_dataset": ref(devices),
        "settings": {"devices": [{"name": "default"}]},
    }
    r = await client.post("/api/v1/jobs", json=body)
    assert (r.status_code, r.json()["field"]) == (400, "devices_dataset"), r.text


def test_a_job_created_before_datasets_were_recorded_still_decodes() -> None:
    old = (
        b'{"type":"JobCreated","id":"e1","at":"2026-01-01T00:00:00Z","actor":"api","v":1,'
        b'"job_id":"job_1","name":"n","targets":[{"url":"http://127.0.0.1:9/"}],"settings":{}}'
    )
    event = decode_event(old)
    assert isinstance(event, JobCreated) and event.datasets == {}
