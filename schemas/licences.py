"""Licence plans: which features a user's jobs may use and the limits they stay within.

A user's plan comes from the log (``LicenseAssigned``; without one, ``DEFAULT_PLAN``).
The API refuses what the plan lacks with 403, and the engine checks again when it
starts a job, so a command published straight to NATS cannot get round the plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import msgspec

from schemas.values import JobKind, JobSettings, Target

Feature = Literal[
    "human_surfing",  # random scrolling, mouse paths, dwell and click simulation
    "external_clicks",  # clicks that follow links to other consented domains
    "proxies",  # jobs that run through a proxy pool
    "proxy_switching",  # rotating proxies per flow
    "proxy_import",  # adding proxies (and proxy datasets)
    "platform_switching",  # rotating device profiles per flow
    "scheduler",  # schedules that start jobs
    "custom_dns",  # a host -> address map instead of the system resolver
]
FEATURES: tuple[Feature, ...] = (
    "human_surfing",
    "external_clicks",
    "proxies",
    "proxy_switching",
    "proxy_import",
    "platform_switching",
    "scheduler",
    "custom_dns",
)

Limit = Literal["instance_count", "flows_per_job", "platforms", "concurrent_jobs"]
LIMITS: tuple[Limit, ...] = ("instance_count", "flows_per_job", "platforms", "concurrent_jobs")


class Limits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``None`` is no limit. ``platforms`` counts the device profiles a job may use."""

    instance_count: int | None = None
    flows_per_job: int | None = None
    platforms: int | None = None
    concurrent_jobs: int | None = None


class Plan(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    features: frozenset[Feature]
    limits: Limits = Limits()

    def grants(self, feature: Feature) -> bool:
        return feature in self.features

    def matrix(self) -> dict[str, object]:
        """What a dashboard needs to lock exactly the controls the plan lacks."""
        return {
            "plan": self.name,
            "features": {feature: feature in self.features for feature in FEATURES},
            "limits": msgspec.structs.asdict(self.limits),
        }


PLANS: dict[str, Plan] = {
    plan.name: plan
    for plan in (
        Plan(
            name="trial",
            features=frozenset(),
            limits=Limits(instance_count=2, flows_per_job=50, platforms=1, concurrent_jobs=1),
        ),
        Plan(
            name="standard",
            features=frozenset({"human_surfing", "proxies", "platform_switching"}),
            limits=Limits(instance_count=20, flows_per_job=5_000, platforms=5, concurrent_jobs=5),
        ),
        Plan(name="enterprise", features=frozenset(FEATURES)),
    )
}
# a self-hosted installation runs everything until an admin assigns a narrower plan
DEFAULT_PLAN = "enterprise"


def plan_named(name: str) -> Plan:
    """The plan of that name; an unknown name (a plan retired since) is the narrowest."""
    return PLANS.get(name, PLANS["trial"])


# -- the check ------------------------------------------------------------------------

# the setting each feature is about, as an API caller spells it
FEATURE_FIELDS: dict[Feature, str] = {
    "human_surfing": "settings.human_surfing",
    "external_clicks": "settings.external_click_ratio",
    "proxies": "settings.proxies",
    "proxy_switching": "settings.proxy_switching",
    "platform_switching": "settings.platform_switching",
    "custom_dns": "settings.dns",
}
LIMIT_FIELDS: dict[Limit, str] = {
    "instance_count": "settings.instance_count",
    "flows_per_job": "targets",
    "platforms": "settings.devices",
    "concurrent_jobs": "concurrent_jobs",
}
REFUSAL_PREFIX = "licence: "


class Refusal(msgspec.Struct, frozen=True):
    """What a plan does not allow: ``name`` the feature it lacks or the limit exceeded,
    ``field`` the job's field that asks for it, ``rule`` what is wrong, naming the plan."""

    name: Feature | Limit
    field: str
    rule: str

    @property
    def reason(self) -> str:
        """As a ``JobRefused`` records it."""
        return f"{REFUSAL_PREFIX}{self.rule}"


def features_used(settings: JobSettings) -> list[Feature]:
    """The features a job's settings ask for, in ``FEATURES`` order."""
    used: dict[Feature, bool] = {
        "human_surfing": settings.human_surfing,
        "external_clicks": settings.external_click_ratio > 0,
        "proxies": settings.proxies is not None,
        "proxy_switching": settings.proxy_switching,
        "platform_switching": settings.platform_switching,
        "custom_dns": bool(settings.dns),
    }
    return [feature for feature in FEATURES if used.get(feature, False)]


def limits_used(
    settings: JobSettings, targets: Sequence[Target], running_jobs: int
) -> dict[Limit, int]:
    """How much of each limit a job takes; ``running_jobs``: its creator's jobs that have
    started and not ended, this one not among them."""
    return {
        "instance_count": settings.instance_count,
        "flows_per_job": sum(target.flows for target in targets),
        "platforms": max(1, len(settings.devices)),  # no profile: the runner's own, one
        "concurrent_jobs": running_jobs + 1,
    }


def feature_refusal(plan: Plan, feature: Feature, field: str) -> Refusal | None:
    if plan.grants(feature):
        return None
    return Refusal(feature, field, f"plan '{plan.name}' does not include {feature}")


def refusal(
    plan: Plan,
    settings: JobSettings,
    targets: Sequence[Target],
    *,
    running_jobs: int,
    kind: JobKind = "flows",
) -> Refusal | None:
    """The first thing ``plan`` does not allow a new job (features first, then limits),
    or ``None`` when it allows it all. An external job runs no flows here: only the
    number of jobs its creator runs at once applies to it."""
    if kind == "flows":
        for feature in features_used(settings):
            found = feature_refusal(plan, feature, FEATURE_FIELDS[feature])
            if found is not None:
                return found
    used = limits_used(settings, targets, running_jobs)
    for limit in LIMITS if kind == "flows" else ("concurrent_jobs",):
        most: int | None = getattr(plan.limits, limit)
        if most is not None and used[limit] > most:
            rule = f"{limit} {used[limit]} exceeds the limit of {most} of plan '{plan.name}'"
            return Refusal(limit, LIMIT_FIELDS[limit], rule)
    return None
