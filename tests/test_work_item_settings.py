"""What of a job's settings its work items carry."""

from __future__ import annotations

import msgspec

from engine.dispatch.actions import BEHAVIOUR, settings_for_runners
from schemas.values import JobSettings, ProxyPool, SecondsRange

# read by the engine alone (dispatching, retries, proxies), never by a runner
ENGINE_SIDE = {
    "instance_count",
    "session_seconds",  # rides along as the item's own session_seconds
    "max_attempts",
    "priority",
    "seed",  # the item carries the flow's seed
    "proxies",  # the item carries the candidates
    "proxy_switching",
    "target_flows",  # counts for dataset rows, applied when the job is created
    "target_clicks",
}


def test_every_setting_is_either_the_runners_or_the_engines() -> None:
    fields = {f.name for f in msgspec.structs.fields(JobSettings)}
    assert set(BEHAVIOUR) | ENGINE_SIDE == fields
    assert not set(BEHAVIOUR) & ENGINE_SIDE


def test_a_plain_job_sends_no_settings_and_one_with_behaviour_sends_them_all() -> None:
    plain = JobSettings(instance_count=50, session_seconds=3, max_attempts=5, seed=7)
    assert settings_for_runners(plain) is None
    surfing = JobSettings(session_seconds=3, traffic_delay=SecondsRange(1, 2))
    assert settings_for_runners(surfing) == surfing
    assert settings_for_runners(JobSettings(human_surfing=False)) is not None
    # settings holding lists (a proxy pool by ids) are values too, never hashed here
    pooled = JobSettings(proxies=ProxyPool(ids=["proxy_a"]), human_surfing=False)
    assert settings_for_runners(pooled) == pooled
    assert settings_for_runners(JobSettings(proxies=ProxyPool(ids=["proxy_a"]))) is None
