"""Licence plans: which features a user's jobs may use and the limits they stay within.

A user's plan comes from the log (``LicenseAssigned``; without one, ``DEFAULT_PLAN``).
The API refuses what the plan lacks with 403, and the engine checks again when it
starts a job, so a command published straight to NATS cannot get round the plan.
"""

from __future__ import annotations

from typing import Literal

import msgspec

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
