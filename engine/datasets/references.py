"""A job made from dataset references: each ``{id, version}`` resolved to its rows, once,
at creation, into the job's own targets and settings.

The job then holds what it was made from (and ``UsedVersion`` records which version and
sha256), so a later version of a dataset never changes a job that exists.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from engine.bus import Bus
from engine.datasets.access import Reader, may_see
from engine.datasets.proxy_pool import MAX_POOL, pool_of
from engine.datasets.service import DatasetCommands
from engine.datasets.versions import opened_version
from engine.errors import Invalid, NotFound, Rejected
from engine.proxies.service import ProxyCommands
from schemas.datasets import DeviceRow, ProxyRow, Row, SettingsRow, TargetRow
from schemas.devices import DeviceProfile
from schemas.events import DatasetKind
from schemas.values import DatasetRef, JobSettings, Target, UsedVersion

MAX_TARGET_ROWS = 10_000  # what one JobCreated holds
# a JobCreated is one NATS message (1 MiB at most by default): its targets stay well within
MAX_TARGETS_BYTES = 768 * 1024
MAX_DEVICE_ROWS = 100  # what a job's settings hold

# the create body's field for each kind a job may reference
FIELD_OF: dict[DatasetKind, str] = {
    "targets": "targets_dataset",
    "proxies": "proxies_dataset",
    "devices": "devices_dataset",
    "settings": "settings_profile",
}


@dataclass(frozen=True)
class JobReferences:
    """What a create body names by reference (``None``: given inline or not at all)."""

    targets: DatasetRef | None = None
    proxies: DatasetRef | None = None
    devices: DatasetRef | None = None
    settings: DatasetRef | None = None

    def named(self) -> dict[DatasetKind, DatasetRef]:
        kinds: tuple[DatasetKind, ...] = ("targets", "proxies", "devices", "settings")
        return {kind: ref for kind in kinds if (ref := getattr(self, kind)) is not None}


@dataclass(frozen=True)
class ResolvedJob:
    targets: list[Target]
    settings: JobSettings
    datasets: dict[str, UsedVersion] = field(default_factory=dict)


async def resolve_job(
    bus: Bus,
    reader: Reader,
    refs: JobReferences,
    *,
    targets: list[Target] | None,
    settings: Mapping[str, Any],
    proxies: ProxyCommands | None = None,
) -> ResolvedJob:
    """The job's targets and settings from its references and inline fields.

    ``settings`` holds only the inline settings fields the caller gave: they override a
    settings profile's. ``NotFound`` (the field named) for a dataset the reader may not
    see or a version it does not have; ``Invalid`` for a dataset of another kind. A
    proxies version's enabled rows are registered with ``proxies`` and become the pool.
    """
    if refs.proxies is not None and "proxies" in settings:
        raise Invalid("proxies_dataset", "name a proxy pool once: settings.proxies or this")
    if refs.devices is not None and "devices" in settings:
        raise Invalid("devices_dataset", "name the devices once: settings.devices or this")
    used: dict[str, UsedVersion] = {}
    rows: dict[DatasetKind, list[Row]] = {}
    for kind, ref in refs.named().items():
        rows[kind], used[kind] = await _rows(bus, reader, kind, ref)
    merged: dict[str, Any] = {}
    if "settings" in rows:
        merged = msgspec.to_builtins(_profile(rows["settings"]).settings)
    merged.update(settings)
    if "devices" in rows:
        merged["devices"] = _devices(rows["devices"])
    try:
        job_settings = msgspec.convert(merged, JobSettings)
    except msgspec.ValidationError as err:
        raise Invalid("settings", str(err)) from None
    if refs.proxies is not None:
        if proxies is None:
            raise Invalid("proxies_dataset", "this server takes no proxy pool from a dataset")
        found = [row for row in rows["proxies"] if isinstance(row, ProxyRow)]
        pool = await pool_of(proxies, refs.proxies, found, reader.user_id)
        job_settings = msgspec.structs.replace(job_settings, proxies=pool)
    if "targets" in rows:
        targets = [
            _target(row, job_settings) for row in rows["targets"] if isinstance(row, TargetRow)
        ]
        size = len(msgspec.json.encode(targets))
        if size > MAX_TARGETS_BYTES:
            raise Rejected(
                "targets_dataset",
                f"its targets take {size} bytes; a job holds at most {MAX_TARGETS_BYTES}",
            )
    return ResolvedJob(targets or [], job_settings, used)


async def _rows(
    bus: Bus, reader: Reader, kind: DatasetKind, ref: DatasetRef
) -> tuple[list[Row], UsedVersion]:
    name = FIELD_OF[kind]
    commands = DatasetCommands(bus)
    dataset = await commands.load(ref.id)
    if (
        not dataset.exists
        or dataset.deleted
        or not may_see(reader, dataset.owner, dataset.shared_with)
    ):
        raise NotFound(f"{name}.id", f"no dataset {ref.id}")
    if dataset.kind != kind:
        raise Invalid(f"{name}.id", f"dataset {ref.id} holds {dataset.kind}, not {kind}")
    try:
        stored = await commands.version(ref.id, ref.version)
    except NotFound:
        raise NotFound(
            f"{name}.version", f"dataset {ref.id} has no version {ref.version}"
        ) from None
    limit = {"targets": MAX_TARGET_ROWS, "devices": MAX_DEVICE_ROWS, "proxies": MAX_POOL}.get(kind)
    if limit is not None and stored.rows > limit:
        raise Rejected(name, f"a job takes at most {limit} {kind} rows (version has {stored.rows})")
    async with opened_version(bus, ref.id, ref.version) as (_, found):
        return list(found), UsedVersion(id=ref.id, version=ref.version, sha256=stored.sha256)


def _profile(rows: list[Row]) -> SettingsRow:
    profiles = [row for row in rows if isinstance(row, SettingsRow)]
    if len(profiles) != 1:
        raise Rejected("settings_profile", f"a job takes one profile (version has {len(rows)})")
    return profiles[0]


def _devices(rows: list[Row]) -> list[Any]:
    return [
        msgspec.to_builtins(msgspec.convert(msgspec.to_builtins(row), DeviceProfile))
        for row in rows
        if isinstance(row, DeviceRow)
    ]


def _target(row: TargetRow, settings: JobSettings) -> Target:
    """A row as a job target: counts it leaves out are the settings' ``target_flows`` and
    ``target_clicks``; its first label of source, keyword, type and id is the label."""
    return Target(
        url=row.url,
        flows=settings.target_flows if row.flow_target is None else row.flow_target,
        clicks=settings.target_clicks if row.click_target is None else row.click_target,
        referrer=row.referrer,
        label=row.source or row.keyword or row.type or row.id,
    )
