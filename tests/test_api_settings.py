"""Job settings through HTTP: what users know (session duration, page traffic, traffic
delay, human surfing, clicks, devices, platform switching) is stored as given, and bad
settings answer 4xx naming the setting and the rule, storing nothing."""

from __future__ import annotations

from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from schemas.devices import DeviceProfile, Viewport
from schemas.values import SecondsRange, SessionDuration
from tests.api_client import JOB, Online, client, runner_online
from tests.conftest import NatsServer
from tests.test_api_jobs import all_job_created

__all__ = ["client", "runner_online"]  # fixtures

TWO_HOSTS = [
    {"url": "http://127.0.0.1:9/", "flows": 2, "clicks": 2, "referrer": "https://ads.example/"},
    {"url": "http://127.0.0.3:9/", "flows": 1},
]
SETTINGS: dict[str, Any] = {
    "instance_count": 2,
    "seed": 7,
    "session_duration": {
        "mode": "variable",
        "distribution": "normal",
        "min_seconds": 20,
        "max_seconds": 90,
        "mean_seconds": 45,
        "stddev_seconds": 15,
    },
    "page_traffic": 4,
    "traffic_delay": {"min_seconds": 1, "max_seconds": 5},
    "human_surfing": True,
    "click_timing": {"min_seconds": 3, "max_seconds": 8},
    "external_click_ratio": 0.25,
    "devices": [
        {"name": "iPhone 13", "locale": "id-ID", "timezone": "Asia/Jakarta"},
        {"name": "default", "viewport": {"width": 1440, "height": 900}},
    ],
    "platform_switching": True,
}


async def test_settings_users_know_are_stored_as_given(
    client: AsyncTestClient, runner_online: Online, nats_server: NatsServer
) -> None:
    await runner_online()
    body = {"name": "settings", "targets": TWO_HOSTS, "settings": SETTINGS}
    response = await client.post("/api/v1/jobs", json=body)
    assert response.status_code == 201, response.text

    (created,) = await all_job_created(nats_server)
    settings = created.settings
    assert settings.session_duration == SessionDuration(
        mode="variable",
        distribution="normal",
        min_seconds=20,
        max_seconds=90,
        mean_seconds=45,
        stddev_seconds=15,
    )
    assert settings.longest_flow_seconds == 95  # the stall clock's session: 90 + 5
    assert (settings.page_traffic, settings.external_click_ratio) == (4, 0.25)
    assert settings.traffic_delay == SecondsRange(min_seconds=1, max_seconds=5)
    assert settings.click_timing == SecondsRange(min_seconds=3, max_seconds=8)
    assert settings.devices == (
        DeviceProfile(name="iPhone 13", locale="id-ID", timezone="Asia/Jakarta"),
        DeviceProfile(name="default", viewport=Viewport(width=1440, height=900)),
    )
    assert settings.platform_switching and settings.human_surfing
    assert created.targets[0].referrer == "https://ads.example/"


def with_settings(**changes: Any) -> dict[str, Any]:
    settings = {k: v for k, v in SETTINGS.items() if v is not None}
    settings.update(changes)
    return {"name": "bad", "targets": TWO_HOSTS, "settings": settings}


@pytest.mark.parametrize(
    ("body", "status", "field", "rule"),
    [
        (
            with_settings(session_duration={"mode": "constant"}),
            400,
            "settings.session_duration.seconds",
            "must be given for mode 'constant'",
        ),
        (
            with_settings(
                session_duration={"mode": "variable", "min_seconds": 9, "max_seconds": 3}
            ),
            400,
            "settings.session_duration.min_seconds",
            "(9.0) must not exceed max_seconds (3.0)",
        ),
        (
            with_settings(
                session_duration={
                    "mode": "variable",
                    "distribution": "normal",
                    "min_seconds": 1,
                    "max_seconds": 3,
                    "mean_seconds": 2,
                }
            ),
            400,
            "settings.session_duration.stddev_seconds",
            "must be given for distribution 'normal'",
        ),
        (
            with_settings(session_duration={"mode": "sometimes", "seconds": 3}),
            400,
            "settings.session_duration.mode",
            "Invalid enum value 'sometimes'",
        ),
        (
            with_settings(traffic_delay={"min_seconds": 5, "max_seconds": 1}),
            400,
            "settings.traffic_delay.min_seconds",
            "(5.0) must not exceed max_seconds (1.0)",
        ),
        (
            with_settings(page_traffic=0),
            400,
            "settings.page_traffic",
            "Expected `int` >= 1",
        ),
        (
            with_settings(external_click_ratio=1.5),
            400,
            "settings.external_click_ratio",
            "Expected `float` <= 1.0",
        ),
        (
            with_settings(devices=[{"name": "iPhone 13", "timezone": "Mars/Base"}]),
            400,
            "settings.devices[0].timezone",
            "must be an IANA time zone name such as 'Europe/Berlin' (got 'Mars/Base')",
        ),
        (
            with_settings(devices=[{"name": "iPhone 13", "viewport": {"width": 0, "height": 5}}]),
            400,
            "settings.devices[0].viewport.width",
            "Expected `int` >= 1",
        ),
        (
            with_settings(pageTraffic=3),
            400,
            "settings.pageTraffic",
            "Object contains unknown field `pageTraffic`",
        ),
        (
            with_settings(devices=[{"name": "default"}, {"name": "Nokia 3310"}]),
            422,
            "settings.devices[1].name",
            "must be 'default' or the name of a Playwright device descriptor",
        ),
        (
            with_settings(devices=[{"name": "Pixel 7"}]),
            422,
            "settings.platform_switching",
            "needs at least two devices to switch between (got 1)",
        ),
        (
            {**with_settings(), "targets": TWO_HOSTS[:1]},
            422,
            "settings.external_click_ratio",
            "needs targets on at least two hosts (got 1)",
        ),
    ],
)
async def test_bad_settings_answer_4xx_naming_the_setting_and_store_nothing(
    client: AsyncTestClient,
    runner_online: Online,
    nats_server: NatsServer,
    body: dict[str, Any],
    status: int,
    field: str,
    rule: str,
) -> None:
    await runner_online()
    response = await client.post("/api/v1/jobs", json=body)
    assert response.status_code == status, response.text
    problem = response.json()
    assert problem["field"] == field, problem
    assert rule in problem["rule"], problem
    assert await all_job_created(nats_server) == []


async def test_jobs_from_before_the_settings_still_create_with_defaults(
    client: AsyncTestClient, runner_online: Online, nats_server: NatsServer
) -> None:
    await runner_online()
    assert (await client.post("/api/v1/jobs", json=JOB)).status_code == 201
    (created,) = await all_job_created(nats_server)
    settings = created.settings
    assert settings.session == SessionDuration(seconds=0)
    assert (settings.page_traffic, settings.human_surfing, settings.devices) == (1, True, ())


async def test_devices_lists_playwright_descriptors_and_default(client: AsyncTestClient) -> None:
    response = await client.get("/api/v1/devices")
    assert response.status_code == 200
    devices = {d["name"]: d for d in response.json()}
    assert devices["default"]["viewport"] == {"width": 1280, "height": 800}
    iphone = devices["iPhone 13"]
    assert (
        iphone["is_mobile"]
        and iphone["has_touch"]
        and iphone["user_agent"].startswith("Mozilla/5.0 (iPhone")
    )
    assert len(devices) > 100
