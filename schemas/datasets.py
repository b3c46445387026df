"""What one row of each dataset kind holds, as stored in a version (JSON lines).

Targets and proxies come from tables (csv, xlsx, docx, txt); device profiles and
settings profiles from JSON. A stored proxy row holds its password: versions live in
the object store, never in the event log, and downloads mask it (see ``masked``).
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from schemas.devices import DeviceProfile
from schemas.events import DatasetKind
from schemas.proxies import (
    MAX_BYPASS,
    MAX_CREDENTIAL_BYTES,
    SCHEMES,
    ProxyDns,
    ProxyScheme,
    normal_bypass_entry,
)
from schemas.values import JobSettings, host_is_valid, url_problem

Label = Annotated[str, msgspec.Meta(max_length=200)]
PASSWORD_MASK = "********"


class TargetRow(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One target: only ``url`` is required; counts left out come from the job's settings.
    ``type``, ``source`` and ``keyword`` are plain labels."""

    url: Annotated[str, msgspec.Meta(min_length=1, max_length=2048)]
    id: Label | None = None
    type: Label | None = None
    source: Label | None = None
    keyword: Label | None = None
    flow_target: Annotated[int, msgspec.Meta(ge=1, le=100_000)] | None = None
    click_target: Annotated[int, msgspec.Meta(ge=0, le=50)] | None = None
    referrer: Annotated[str, msgspec.Meta(max_length=2048)] | None = None

    def __post_init__(self) -> None:
        if (problem := url_problem(self.url)) is not None:
            raise ValueError(f"url {problem}")
        if self.referrer is not None and (problem := url_problem(self.referrer)) is not None:
            raise ValueError(f"referrer {problem}")


BypassHost = Annotated[str, msgspec.Meta(min_length=1, max_length=253)]
Credential = Annotated[str, msgspec.Meta(max_length=MAX_CREDENTIAL_BYTES)]


class ProxyRow(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One upstream proxy; a job pools the ``enabled`` ones. ``bypass``: hosts its flows
    reach directly (never through it; a ``*.`` entry covers the domain's subdomains);
    ``dns``: where names are resolved, by the runner (``local``) or by the proxy."""

    scheme: ProxyScheme
    host: Annotated[str, msgspec.Meta(min_length=1, max_length=253)]
    port: Annotated[int, msgspec.Meta(ge=1, le=65_535)]
    username: Credential = ""
    password: Credential = ""
    label: Label | None = None
    country: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    enabled: bool = True
    bypass: Annotated[list[BypassHost], msgspec.Meta(max_length=MAX_BYPASS)] = []
    dns: ProxyDns = "local"

    def __post_init__(self) -> None:
        if not host_is_valid(self.host):
            raise ValueError("host must be a domain name or an IP address")
        if bool(self.username) != bool(self.password):
            raise ValueError("password must be given with a username, and only with one")
        for host in self.bypass:
            normal_bypass_entry(host)  # its ValueError names the entry and the rule

    def __repr__(self) -> str:
        return f"ProxyRow({self.scheme}://{self.host}:{self.port}, password=<hidden>)"


class DeviceRow(DeviceProfile, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """A device profile: a catalogue descriptor by name, with overrides (os and browser
    family among them). Its name is checked against the catalogue in use when the file
    is imported, and against the job's own version when a job uses it."""


class SettingsRow(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A named settings profile: every job setting, so a job starts from references only."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    settings: JobSettings = JobSettings()


Row = TargetRow | ProxyRow | DeviceRow | SettingsRow
ROW_TYPES: dict[DatasetKind, type[Row]] = {
    "targets": TargetRow,
    "proxies": ProxyRow,
    "devices": DeviceRow,
    "settings": SettingsRow,
}
SCHEME_RULE = f"must be one of {', '.join(SCHEMES)}"


def masked(row: Row) -> Row:
    """The row as a download shows it: a proxy's password replaced by a mask."""
    if isinstance(row, ProxyRow) and row.password:
        return msgspec.structs.replace(row, password=PASSWORD_MASK)
    return row
