"""Every list that grows answers a page at a time: limit, and a cursor to the next page."""

from __future__ import annotations

import pytest
from litestar.testing import AsyncTestClient

from engine.bus import Bus, BusConfig
from tests.api_client import JOB, client, put_presence
from tests.test_api_metrics import a_run

__all__ = ["client"]  # fixtures


@pytest.fixture
def bus_config() -> BusConfig:
    """Presence that outlives the test on a loaded machine: it pages runners, not liveness."""
    return BusConfig(ack_wait=3.0, presence_ttl=120.0)


async def walk(client: AsyncTestClient, path: str, key: str) -> list[list[str]]:
    """Every page of a list, following TB-Next-Cursor; each page's keys."""
    pages: list[list[str]] = []
    url: str | None = path
    while url is not None:
        r = await client.get(url)
        assert r.status_code == 200, r.text
        pages.append([item[key] for item in r.json()])
        cursor = r.headers.get("TB-Next-Cursor")
        if cursor is None:
            assert "Link" not in r.headers
            url = None
        else:
            assert (
                r.headers["Link"].endswith('rel="next"') and f"cursor={cursor}" in r.headers["Link"]
            )
            url = f"{path}&cursor={cursor}"
        assert len(pages) < 20
    return pages


async def test_every_growing_list_pages_with_limit_and_cursor(
    client: AsyncTestClient, bus: Bus
) -> None:
    await put_presence(bus, "linux")
    await put_presence(bus, "windows")
    await put_presence(bus, "macos")
    job_ids = []
    for n in range(5):
        created = await client.post("/api/v1/jobs", json={**JOB, "name": f"job {n}"})
        job_ids.append(created.json()["job_id"])
    for domain in ("a.example", "b.example", "c.example"):
        await client.post("/api/v1/consents", json={"domain": domain})
    proxy_ids = []
    for port in (3001, 3002, 3003):
        registered = await client.post("/api/v1/proxies", json={"url": f"http://127.0.0.1:{port}"})
        proxy_ids.append(registered.json()["proxy_id"])
    seq = await a_run(bus)
    assert (await client.get(f"/api/v1/jobs?min_seq={seq}")).status_code == 200

    jobs = await walk(client, "/api/v1/jobs?limit=2", "job_id")
    assert [len(p) for p in jobs] == [2, 2, 2]
    everything = [j for p in jobs for j in p]
    assert sorted(everything) == sorted([*job_ids, "job_m"]) and len(set(everything)) == 6
    newest_first = (await client.get("/api/v1/jobs?limit=500")).json()
    assert everything == [j["job_id"] for j in newest_first]
    assert await walk(client, "/api/v1/jobs?limit=6", "job_id") == [everything]

    flows = await walk(client, "/api/v1/jobs/job_m/flows?limit=3", "flow_id")
    assert flows == [["m0", "m1", "m2"], ["m3"]]
    assert await walk(client, "/api/v1/jobs/job_m/flows?limit=9&status=done", "flow_id") == [
        ["m0", "m1", "m2"]
    ]
    assert await walk(client, "/api/v1/consents?limit=2", "domain") == [
        ["a.example", "b.example"],
        ["c.example"],
    ]
    assert await walk(client, "/api/v1/proxies?limit=2", "proxy_id") == [
        proxy_ids[:2],
        proxy_ids[2:],
    ]
    assert await walk(client, "/api/v1/runners?limit=2", "id") == [
        ["runner_linux", "runner_macos"],
        ["runner_windows"],
    ]
    assert await walk(client, "/api/v1/runners/status?limit=1", "id") == [
        ["runner_linux"],
        ["runner_macos"],
        ["runner_windows"],
    ]


async def test_a_bad_limit_or_cursor_is_a_400_naming_it(client: AsyncTestClient) -> None:
    paths = ["/api/v1/jobs", "/api/v1/jobs/job_m/flows", "/api/v1/consents", "/api/v1/proxies"]
    paths += ["/api/v1/runners", "/api/v1/runners/status"]
    bad = [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=ten", "limit"),
        ("cursor=%21%21", "cursor"),
        ("cursor=WzEsMl0", "cursor"),  # [1,2]: not the key this list sorts by
        ("cursor=" + "A" * 1025, "cursor"),
    ]
    for path in paths:
        for query, field in bad:
            r = await client.get(f"{path}?{query}")
            assert r.status_code == 400, (path, query, r.text)
            assert r.json()["field"] == field, (path, query, r.json())
