"""The licence check: which feature or limit of a plan a job's settings would break."""

from __future__ import annotations

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from schemas.devices import DeviceProfile
from schemas.licences import (
    FEATURE_FIELDS,
    FEATURES,
    LIMIT_FIELDS,
    LIMITS,
    PLANS,
    Limits,
    Plan,
    Refusal,
    features_used,
    limits_used,
    refusal,
)
from schemas.values import DnsEntry, JobSettings, ProxyPool, Target

TRIAL, STANDARD, ENTERPRISE = PLANS["trial"], PLANS["standard"], PLANS["enterprise"]
PLAIN = JobSettings(human_surfing=False)  # uses no feature at all
ONE = [Target(url="http://a.test/", flows=1)]


def test_trial_refuses_human_surfing_naming_the_field_the_feature_and_the_plan() -> None:
    found = refusal(TRIAL, JobSettings(human_surfing=True), ONE, running_jobs=0)
    assert found == Refusal(
        "human_surfing", "settings.human_surfing", "plan 'trial' does not include human_surfing"
    )
    assert found.reason == "licence: plan 'trial' does not include human_surfing"


def test_each_feature_is_refused_by_the_plan_without_it() -> None:
    asks = {
        "external_clicks": JobSettings(human_surfing=False, external_click_ratio=0.2),
        "proxies": JobSettings(human_surfing=False, proxies=ProxyPool(label="eu")),
        "proxy_switching": JobSettings(human_surfing=False, proxy_switching=True),
        "platform_switching": JobSettings(human_surfing=False, platform_switching=True),
        "custom_dns": JobSettings(
            human_surfing=False, dns=(DnsEntry(host="a.test", address="127.0.0.1"),)
        ),
    }
    for feature, settings in asks.items():
        without = Plan(name="narrow", features=frozenset(FEATURES) - {feature})
        found = refusal(without, settings, ONE, running_jobs=0)
        assert found is not None and found.name == feature, feature
        assert f"does not include {feature}" in found.rule and "'narrow'" in found.rule
        assert refusal(ENTERPRISE, settings, ONE, running_jobs=0) is None


def test_limits_name_the_limit_the_value_and_the_plan() -> None:
    found = refusal(STANDARD, JobSettings(instance_count=21), ONE, running_jobs=0)
    assert found == Refusal(
        "instance_count",
        "settings.instance_count",
        "instance_count 21 exceeds the limit of 20 of plan 'standard'",
    )
    many = [Target(url="http://a.test/", flows=30), Target(url="http://b.test/", flows=21)]
    found = refusal(TRIAL, PLAIN, many, running_jobs=0)
    assert found is not None and (found.name, found.field) == ("flows_per_job", "targets")
    assert "flows_per_job 51 exceeds the limit of 50" in found.rule
    two = JobSettings(human_surfing=False, devices=(DeviceProfile(), DeviceProfile(name="iPad")))
    found = refusal(TRIAL, two, ONE, running_jobs=0)
    assert found is not None and (found.name, found.field) == ("platforms", "settings.devices")
    found = refusal(TRIAL, PLAIN, ONE, running_jobs=1)
    assert found is not None and found.rule == (
        "concurrent_jobs 2 exceeds the limit of 1 of plan 'trial'"
    )
    assert refusal(TRIAL, PLAIN, ONE, running_jobs=0) is None  # within every limit


def test_no_device_profile_counts_as_one_platform() -> None:
    assert limits_used(PLAIN, ONE, 0)["platforms"] == 1
    one_plat = Plan(name="p", features=frozenset(), limits=Limits(platforms=1))
    assert refusal(one_plat, PLAIN, ONE, running_jobs=0) is None


def test_features_come_before_limits() -> None:
    both = JobSettings(human_surfing=True, instance_count=50)
    found = refusal(TRIAL, both, ONE, running_jobs=5)
    assert found is not None and found.name == "human_surfing"


def test_an_external_job_counts_only_towards_concurrent_jobs() -> None:
    # its settings are the defaults (human surfing on) and it has no targets: neither is
    # anything it runs here
    assert refusal(TRIAL, JobSettings(), [], running_jobs=0, kind="external") is None
    found = refusal(TRIAL, JobSettings(), [], running_jobs=1, kind="external")
    assert found is not None and found.name == "concurrent_jobs"


# -- properties -----------------------------------------------------------------------

settings_st = st.builds(
    JobSettings,
    instance_count=st.integers(1, 500),
    human_surfing=st.booleans(),
    external_click_ratio=st.sampled_from([0.0, 0.0, 0.3, 1.0]),
    proxies=st.sampled_from([None, ProxyPool(label="eu")]),
    proxy_switching=st.booleans(),
    platform_switching=st.booleans(),
    dns=st.sampled_from([(), (DnsEntry(host="a.test", address="10.0.0.1"),)]),
    devices=st.integers(0, 8).map(lambda n: (DeviceProfile(),) * n),
)
targets_st = st.lists(
    st.integers(1, 100_000).map(lambda n: Target(url="http://a.test/", flows=n)),
    min_size=1,
    max_size=4,
)
limit_st = st.none() | st.integers(1, 200_000)
plan_st = st.builds(
    Plan,
    name=st.just("p"),
    features=st.frozensets(st.sampled_from(FEATURES)),
    limits=st.builds(
        Limits,
        instance_count=limit_st,
        flows_per_job=limit_st,
        platforms=limit_st,
        concurrent_jobs=limit_st,
    ),
)
running_st = st.integers(0, 50)


@given(settings_st, targets_st, running_st)
def test_enterprise_never_refuses(
    settings: JobSettings, targets: list[Target], running: int
) -> None:
    assert refusal(ENTERPRISE, settings, targets, running_jobs=running) is None


@given(plan_st, settings_st, targets_st, running_st)
def test_a_refusal_names_what_the_plan_lacks_and_a_pass_lacks_nothing(
    plan: Plan, settings: JobSettings, targets: list[Target], running: int
) -> None:
    found = refusal(plan, settings, targets, running_jobs=running)
    used = limits_used(settings, targets, running)
    over = {
        limit
        for limit in LIMITS
        if getattr(plan.limits, limit) is not None and used[limit] > getattr(plan.limits, limit)
    }
    lacking = {f for f in features_used(settings) if not plan.grants(f)}
    if found is None:
        assert not over and not lacking
        return
    assert found.name in lacking | over
    assert f"'{plan.name}'" in found.rule and found.name in found.rule
    fields: dict[str, str] = {k: v for k, v in [*FEATURE_FIELDS.items(), *LIMIT_FIELDS.items()]}
    assert found.field == fields[found.name]


def tightened(plan: Plan, data: st.DataObject) -> Plan:
    kept = st.sampled_from(sorted(plan.features))
    features = data.draw(st.frozensets(kept) if plan.features else st.just(frozenset()))
    limits: dict[str, int | None] = {}
    for limit in LIMITS:
        most = getattr(plan.limits, limit)
        limits[limit] = data.draw(st.integers(1, most) if most is not None else limit_st)
    return Plan(name="tighter", features=features, limits=msgspec.convert(limits, Limits))


@given(plan_st, settings_st, targets_st, running_st, st.data())
def test_tightening_a_plan_never_turns_a_refusal_into_a_pass(
    plan: Plan, settings: JobSettings, targets: list[Target], running: int, data: st.DataObject
) -> None:
    tighter = tightened(plan, data)
    if refusal(plan, settings, targets, running_jobs=running) is not None:
        assert refusal(tighter, settings, targets, running_jobs=running) is not None
