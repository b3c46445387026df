"""The device catalogue over HTTP with a real nats-server: a second shipped version is
offered ("update platform data available"), an admin takes it, jobs keep the version they
were created with down to the runner; replicas and engines agree on one version in use."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from agents.behaviour import plan_for
from agents.device_context import device_for
from agents.executor import AllowedHosts, FlowReport, FlowResult
from agents.runner import Runner
from api.app import create_app
from api.devices import UPDATE_AVAILABLE
from engine.bus import Bus
from engine.devices import DeviceCatalogues
from schemas import subjects
from schemas.device_catalogue import ShippedCatalogues
from schemas.devices import Device
from schemas.events import DeviceCatalogueAdopted, FlowDispatched, FlowFailed, JobCreated
from tests.api_client import api_config, log_in, put_presence, when_registered
from tests.conftest import NatsServer
from tests.datasets import upload
from tests.device_catalogues import (
    GONE,
    IPHONE,
    IPHONE_V2_AGENT,
    NEW_PHONE,
    add_version_2,
    with_version_1,
)
from tests.harness import embedded

CATALOGUE = "/api/v1/devices/catalogue"
UPDATE = "/api/v1/devices/catalogue/update"
WAIT = 30


class DevicesSeen:
    """A runner's executor that presents each flow's device as the Playwright executor
    resolves it (``device_for``), and keeps what it presented, by job."""

    def __init__(self, shipped: ShippedCatalogues) -> None:
        self.shipped = shipped
        self.seen: defaultdict[str, list[Device]] = defaultdict(list)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def run(
        self, item: FlowDispatched, report: FlowReport, hosts: AllowedHosts | None = None
    ) -> FlowResult:
        device = device_for(item, plan_for(item).device, self.shipped)
        self.seen[item.job_id].append(device)
        return FlowResult(clicks_done=item.clicks, pages=1, device=device.name)


def job_body(name: str, *devices: str, max_attempts: int = 3) -> dict[str, Any]:
    return {
        "name": name,
        "targets": [{"url": "http://127.0.0.1:9/", "flows": 4, "clicks": 0}],
        "settings": {
            "session_seconds": 0,
            "max_attempts": max_attempts,
            "devices": [{"name": d} for d in devices],
            "platform_switching": len(devices) > 1,
        },
    }


async def adoptions(bus: Bus) -> list[DeviceCatalogueAdopted]:
    return [
        env.event
        for env in await bus.load(subjects.DEVICE_CATALOGUE)
        if isinstance(env.event, DeviceCatalogueAdopted)
    ]


@asynccontextmanager
async def api(
    nats_server: NatsServer,
    tmp_path: Path,
    shipped: ShippedCatalogues,
    db: str = "api.db",
    token: AsyncTestClient | None = None,
) -> AsyncIterator[AsyncTestClient]:
    """The API shipping ``shipped``, with a client logged in as the first admin, or with
    the session of ``token``'s client (a second login would end the first session)."""
    config = api_config(nats_server, tmp_path, device_catalogues=shipped, db_path=tmp_path / db)
    async with AsyncTestClient(app=create_app(config)) as client:
        if token is None:
            await log_in(client)
        else:
            client.headers["Authorization"] = str(token.headers["Authorization"])
        yield client


async def as_viewer(client: AsyncTestClient) -> AsyncTestClient:
    password = "viewer-password-long"
    r = await client.post(
        "/api/v1/users", json={"username": "watcher", "password": password, "role": "viewer"}
    )
    assert r.status_code == 201, r.text
    viewer = AsyncTestClient(app=client.app)
    viewer.blocking_portal = client.blocking_portal  # the same running app and loop
    await log_in(viewer, "watcher", password)
    return viewer


async def test_a_second_shipped_version_is_offered_taken_and_only_new_jobs_use_it(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    shipped = with_version_1(tmp_path / "catalogues")
    async with (
        embedded(bus, nats_server.url, tmp_path) as tb,
        api(nats_server, tmp_path, shipped) as client,
    ):
        await tb.authorise("127.0.0.1")
        first = (await client.get(CATALOGUE)).json()
        assert first["in_use"]["version"] == 1 and first["in_use"]["adopted_by"] == "system"
        assert (first["available"], first["message"]) == (None, None)
        await put_presence(bus)
        before = await client.post("/api/v1/jobs", json=job_body("before", IPHONE))
        assert before.status_code == 201, before.text
        unknown = await client.post("/api/v1/jobs", json=job_body("new phone", NEW_PHONE))
        assert unknown.status_code == 422, unknown.text
        assert unknown.json()["field"] == "settings.devices[0].name"

        add_version_2(shipped)  # a package upgrade ships version 2
        offered = (await client.get(CATALOGUE)).json()
        assert offered["in_use"]["version"] == 1
        assert offered["available"]["version"] == 2
        assert offered["available"]["source"] == "playwright 9.9.9"
        assert offered["message"] == UPDATE_AVAILABLE == "update platform data available"
        listed = {d["name"] for d in (await client.get("/api/v1/devices")).json()}
        assert GONE in listed and NEW_PHONE not in listed
        preview = (await client.get("/api/v1/devices?version=2")).json()
        assert NEW_PHONE in {d["name"] for d in preview}

        viewer = await as_viewer(client)
        assert (await viewer.get(CATALOGUE)).json()["available"]["version"] == 2
        refused = await viewer.post(UPDATE)
        assert refused.status_code == 403 and "admin" in refused.json()["detail"]
        assert [a.version for a in await adoptions(bus)] == [1]

        taken = await client.post(UPDATE)
        assert taken.status_code == 200, taken.text
        now = taken.json()
        assert (now["in_use"]["version"], now["available"], now["message"]) == (2, None, None)
        again = await client.post(UPDATE)
        assert again.status_code == 409 and "nothing newer" in again.json()["rule"], again.text
        listed = {d["name"] for d in (await client.get("/api/v1/devices")).json()}
        assert NEW_PHONE in listed and GONE not in listed

        await put_presence(bus)
        after = await client.post("/api/v1/jobs", json=job_body("after", IPHONE))
        assert after.status_code == 201, after.text
        taken_phone = await client.post("/api/v1/jobs", json=job_body("new phone", NEW_PHONE))
        assert taken_phone.status_code == 201, taken_phone.text
        gone = await client.post("/api/v1/jobs", json=job_body("gone", GONE))
        assert gone.status_code == 422, gone.text

        # the runner starts after the update: the job made before still presents version 1
        executor, registered = DevicesSeen(shipped), asyncio.Event()
        runner = Runner(bus, executor, slots=2, announce=when_registered(registered))
        tb.run(runner.run(), "runner")
        old_job, new_job = before.json()["job_id"], after.json()["job_id"]
        for job_id in (old_job, new_job):
            view = await tb.wait_terminal(job_id, timeout=WAIT)
            assert (view.status, view.flows_done) == ("completed", 4)
        v1 = shipped.get(1)
        assert v1 is not None
        assert {d.user_agent for d in executor.seen[old_job]} == {v1.devices[IPHONE]["user_agent"]}
        assert {d.user_agent for d in executor.seen[new_job]} == {IPHONE_V2_AGENT}
        assert (await client.get(f"/api/v1/jobs/{old_job}")).json()["device_catalogue"] == 1
        assert (await client.get(f"/api/v1/jobs/{new_job}")).json()["device_catalogue"] == 2
        admin = (await client.get("/api/v1/auth/me")).json()["user_id"]

    log = await adoptions(bus)
    assert [(a.version, a.previous, a.actor) for a in log] == [(1, 0, "system"), (2, 1, admin)]


async def test_a_runner_without_the_jobs_version_fails_its_flows_for_another_runner(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    shipped = with_version_1(tmp_path / "api")
    add_version_2(shipped)  # a fresh system: it adopts version 2 at once
    older = with_version_1(tmp_path / "runner")  # a runner of the previous package
    async with (
        embedded(bus, nats_server.url, tmp_path) as tb,
        api(nats_server, tmp_path, shipped) as client,
    ):
        await tb.authorise("127.0.0.1")
        registered = asyncio.Event()
        runner = Runner(bus, DevicesSeen(older), slots=2, announce=when_registered(registered))
        tb.run(runner.run(), "runner")
        async with asyncio.timeout(WAIT):
            await registered.wait()
        created = await client.post("/api/v1/jobs", json=job_body("j", IPHONE, max_attempts=1))
        assert created.status_code == 201, created.text
        job_id = created.json()["job_id"]
        view = await tb.wait_terminal(job_id, timeout=WAIT)
        assert view.status == "failed"
    failed = [
        env.event
        for env in await bus.load(subjects.flow_subject(job_id, "FlowFailed"))
        if isinstance(env.event, FlowFailed)
    ]
    assert failed and all(f.retryable for f in failed)
    assert all("version 2 is not shipped with this runner" in f.reason for f in failed)


async def test_replicas_of_two_packages_agree_on_the_version_in_use(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    """A rolling upgrade: replica ``old`` ships version 1, ``new`` ships 1 and 2."""
    old_shelf = with_version_1(tmp_path / "old")
    new_shelf = with_version_1(tmp_path / "new")
    async with api(nats_server, tmp_path, old_shelf, "old.db") as old:
        add_version_2(new_shelf)
        async with api(nats_server, tmp_path, new_shelf, "new.db", token=old) as new:
            from_old, from_new = (
                (await old.get(CATALOGUE)).json(),
                (await new.get(CATALOGUE)).json(),
            )
            assert from_old["in_use"] == from_new["in_use"]
            assert from_old["in_use"]["version"] == 1  # the first to start adopted its newest
            assert from_old["available"] is None and from_new["available"]["version"] == 2

            assert (await old.post(UPDATE)).status_code == 409  # it ships nothing newer
            assert (await new.post(UPDATE)).status_code == 200
            from_old, from_new = (
                (await old.get(CATALOGUE)).json(),
                (await new.get(CATALOGUE)).json(),
            )
            assert from_old["in_use"] == {**from_new["in_use"], "devices": None}
            assert from_new["in_use"]["version"] == 2 and from_new["in_use"]["devices"]

            await put_presence(bus)
            named = await old.post("/api/v1/jobs", json=job_body("named", IPHONE))
            assert named.status_code == 422 and "not shipped" in named.json()["rule"], named.text
            listed = await old.get("/api/v1/devices")
            assert listed.status_code == 409 and "version 2 is in use" in listed.json()["rule"]
            plain = await old.post("/api/v1/jobs", json=job_body("plain"))
            assert plain.status_code == 201, plain.text
            seq = plain.json()["seq"]
            job = await new.get(f"/api/v1/jobs/{plain.json()['job_id']}?min_seq={seq}")
            assert job.json()["device_catalogue"] == 2


async def test_two_admins_updating_at_once_take_the_version_once(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    shelf = with_version_1(tmp_path / "catalogues")
    async with (
        api(nats_server, tmp_path, shelf, "a.db") as a,
        api(nats_server, tmp_path, shelf, "b.db", token=a) as b,
    ):
        add_version_2(shelf)
        answers = await asyncio.gather(*(c.post(UPDATE) for c in (a, b, a, b)))
        assert {r.status_code for r in answers} <= {200, 409}
        assert 200 in {r.status_code for r in answers}
        assert {r.json()["in_use"]["version"] for r in answers if r.status_code == 200} == {2}
    assert [a.version for a in await adoptions(bus)] == [1, 2]


async def test_engines_starting_together_adopt_once(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """Several engines, of two packages, start at once on a fresh system: one adoption."""
    older = with_version_1(tmp_path / "older")
    newer = with_version_1(tmp_path / "newer")
    add_version_2(newer)
    buses = [await Bus.connect(nats_server.url, name=f"engine-{n}") for n in range(8)]
    try:
        await buses[0].provision()
        started = await asyncio.gather(
            *(
                DeviceCatalogues(bus, older if n % 2 else newer).adopt_at_first_start()
                for n, bus in enumerate(buses)
            )
        )
        log = await adoptions(buses[0])
    finally:
        for bus in buses:
            await bus.close()
    assert len(log) == 1 and log[0].previous == 0
    assert {(s.version, s.sha256, s.seq) for s in started} == {
        (log[0].version, log[0].sha256, started[0].seq)
    }


@pytest.mark.slow
async def test_two_engine_processes_starting_together_adopt_once(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    shelves = [with_version_1(tmp_path / "a"), with_version_1(tmp_path / "b")]
    add_version_2(shelves[1])
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cli.main",
            "engine",
            "--nats-url",
            nats_server.url,
            env={**os.environ, "TB_DEVICE_CATALOGUES": str(shelf.directory)},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        for shelf in shelves
    ]
    try:

        async def running(proc: asyncio.subprocess.Process) -> None:
            assert proc.stderr is not None
            while b"Engine running" not in await proc.stderr.readline():
                assert proc.returncode is None, "the engine stopped"

        async with asyncio.timeout(WAIT):
            await asyncio.gather(*(running(proc) for proc in procs))
    finally:
        for proc in procs:
            proc.kill()
            await proc.wait()
    log = await adoptions(bus)
    assert len(log) == 1 and log[0].actor == "system" and log[0].version in (1, 2)


async def test_device_datasets_take_families_and_names_of_the_catalogue_in_use(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    shipped = with_version_1(tmp_path / "catalogues")
    rows = [
        {"Name": IPHONE, "OS": "iOS"},
        {"device": "default", "os_family": "Windows", "browser": "Chrome", "DPR": 2},
    ]
    async with api(nats_server, tmp_path, shipped) as client:
        status, body = await upload(client, json.dumps(rows).encode(), kind="devices", fmt="json")
        assert status == 201, body
        ref = {"id": body["dataset_id"], "version": body["version"]}
        new = json.dumps([{"name": NEW_PHONE}]).encode()
        status, body = await upload(client, new, kind="devices", fmt="json")
        assert status == 422 and body["errors"][0]["field"] == "name", body
        assert "catalogue in use (version 1)" in body["errors"][0]["rule"]
        bad = json.dumps([{"name": IPHONE, "os": "BeOS"}]).encode()
        status, body = await upload(client, bad, kind="devices", fmt="json")
        assert status == 422 and body["errors"][0]["field"] == "os", body

        await put_presence(bus, "windows")
        job = {**job_body("from dataset"), "devices_dataset": ref}
        del job["settings"]["devices"]
        job["platform"] = {"os": "windows", "browser": "chromium"}
        created = await client.post("/api/v1/jobs", json=job)
        assert created.status_code == 201, created.text
        await put_presence(bus)
        on_linux = await client.post("/api/v1/jobs", json={**job, "platform": None})
        assert on_linux.status_code == 422, on_linux.text
        assert on_linux.json()["field"] == "settings.devices[1].os"
        safari = json.dumps([{"name": IPHONE, "Browser Family": "Safari"}]).encode()
        status, body = await upload(client, safari, kind="devices", fmt="json")
        assert status == 201, body
        ref = {"id": body["dataset_id"], "version": body["version"]}
        in_chromium = {**job, "platform": None, "devices_dataset": ref}
        refused = await client.post("/api/v1/jobs", json=in_chromium)
        assert refused.status_code == 422, refused.text
        assert refused.json()["field"] == "settings.devices[0].browser"

        add_version_2(shipped)
        assert (await client.post(UPDATE)).status_code == 200
        status, body = await upload(client, new, kind="devices", fmt="json")
        assert status == 201, body
    (created_event, *_) = [
        env.event
        for env in await bus.load(subjects.all_jobs("JobCreated"))
        if isinstance(env.event, JobCreated)
    ]
    devices = created_event.settings.devices
    assert [(d.name, d.os, d.browser) for d in devices] == [
        (IPHONE, "ios", None),
        ("default", "windows", "chromium"),
    ]
    assert devices[1].device_scale_factor == 2
