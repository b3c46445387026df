"""Request and response bodies of the HTTP API (read models live in projections.queries)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from schemas.consent_state import ConsentStatus
from schemas.values import ConsentCaps, DatasetRef, Domain, JobSettings, Platform, Target

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class CreateJobIn(msgspec.Struct, forbid_unknown_fields=True):
    """Targets inline (``targets``) or by reference (``targets_dataset``), exactly one;
    ``settings`` fields given override a ``settings_profile``'s."""

    name: Name
    targets: Annotated[list[Target], msgspec.Meta(min_length=1, max_length=1000)] | None = None
    settings: JobSettings = JobSettings()
    platform: Platform | None = None
    targets_dataset: DatasetRef | None = None
    proxies_dataset: DatasetRef | None = None
    devices_dataset: DatasetRef | None = None
    settings_profile: DatasetRef | None = None

    def __post_init__(self) -> None:
        if (self.targets is None) == (self.targets_dataset is None):
            raise ValueError("targets must be given, or targets_dataset: exactly one of the two")


Reason = Annotated[str, msgspec.Meta(max_length=500)]


class PauseIn(msgspec.Struct, forbid_unknown_fields=True):
    reason: Reason = "paused by api"


class RevokeIn(msgspec.Struct, forbid_unknown_fields=True):
    reason: Reason = ""


class Created(msgspec.Struct):
    job_id: str
    seq: int  # a read can wait for the projection to reach it


class Accepted(msgspec.Struct):
    job_id: str
    seq: int
    status: str


class CapsIn(msgspec.Struct, forbid_unknown_fields=True):
    """Limits for a domain, each at most the server's ceiling; one left out is its default
    (20 sessions, 600 flows a minute) lowered to the ceiling."""

    max_concurrent: Annotated[int, msgspec.Meta(ge=1, le=10_000)] | None = None
    max_flows_per_minute: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None

    def asked(self) -> dict[str, int | None]:
        return {f: getattr(self, f) for f in self.__struct_fields__}


class ClaimIn(msgspec.Struct, forbid_unknown_fields=True):
    domain: Domain
    caps: CapsIn | None = None
    # cover every subdomain too: granted only by a DNS verification
    include_subdomains: bool = False


class Claimed(msgspec.Struct):
    domain: str
    token: str
    well_known_url: str  # serve the token here (method well-known) ...
    dns_record: str  # ... or publish it as a TXT record of this name (method dns)
    seq: int


class VerifyIn(msgspec.Struct, forbid_unknown_fields=True):
    method: Literal["well-known", "dns"] = "well-known"
    base_url: Annotated[str, msgspec.Meta(max_length=2048)] | None = None  # well-known only
    caps: CapsIn | None = None  # None keeps the claim's


class Verified(msgspec.Struct):
    domain: str
    status: Literal["verified"]
    method: Literal["well-known", "dns"]
    evidence: str
    verified_at: datetime
    expires_at: datetime
    caps: ConsentCaps
    include_subdomains: bool
    seq: int


class Rechecked(msgspec.Struct):
    domain: str
    found: Literal["served", "absent", "unreachable"]
    status: ConsentStatus
    reason: str  # why the token was not found ("" when it was)
    seq: int


class Revoked(msgspec.Struct):
    domain: str
    status: Literal["revoked"]
    seq: int


class Health(msgspec.Struct):
    status: Literal["ok"]


class Problem(msgspec.Struct, omit_defaults=True):
    """Every 4xx body: ``detail`` names the field and the rule."""

    status_code: int
    detail: str
    field: str | None = None
    rule: str | None = None


class AvailablePlatform(msgspec.Struct):
    os: str
    browser: str
    runners: int
    slots: int


class Readiness(msgspec.Struct, kw_only=True):
    status: Literal["ready", "not ready"]
    missing: list[str]
    projection_seq: int  # the read model's checkpoint
    stream_last_seq: int | None = None  # None while the stream cannot be read
    projection_lag: int | None = None  # events stored and not yet applied
