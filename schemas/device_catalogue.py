"""The device catalogue: versions of Playwright's device descriptors shipped with the package.

Each version is one file, ``device_catalogues/<version>.json``: its ``version``, its
``source`` (the Playwright release it was taken from) and its ``devices``, one a line
(``scripts/refresh_devices.py`` writes the next version; a version once shipped never
changes). Which version a system uses is a fact of the log (``DeviceCatalogueAdopted``),
never a file: every engine, API and runner resolves a job's devices against the
version the job was created with, by version and content hash.

The shipped directory can be another (``ShippedCatalogues(directory)``; the processes
read it from ``TB_DEVICE_CATALOGUES``).
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec

from schemas.devices import DEFAULT_DEVICE, Descriptor
from schemas.values import Sha256

CATALOGUE_DIR = Path(__file__).resolve().parent / "device_catalogues"
# jobs and work items from before catalogues had versions used what became version 1
LEGACY_VERSION = 1

Version = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
_FILE = re.compile(r"^([1-9][0-9]{0,6})\.json$")


class CatalogueVersion(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One catalogue version exactly: its number and the sha256 of its content."""

    version: Version
    sha256: Sha256


class CatalogueFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: Version
    source: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    devices: dict[str, dict[str, Any]]


class CatalogueBroken(Exception):
    """A shipped catalogue file that is not one (a packaging fault, never user input)."""


@dataclass(frozen=True)
class DeviceCatalogue:
    """One shipped version, read: ``sha256`` is that of its canonical JSON (keys sorted,
    no spaces), so a file re-indented or with other line ends is the same catalogue."""

    version: int
    source: str
    sha256: str
    devices: Mapping[str, Descriptor]

    @property
    def ref(self) -> CatalogueVersion:
        return CatalogueVersion(version=self.version, sha256=self.sha256)

    def names(self) -> list[str]:
        """Every name a profile may give: ``default`` first, then the descriptors'."""
        return [DEFAULT_DEVICE, *sorted(self.devices)]

    def knows(self, name: str) -> bool:
        return name == DEFAULT_DEVICE or name in self.devices


def content_sha256(file: CatalogueFile) -> str:
    return hashlib.sha256(msgspec.json.encode(file, order="sorted")).hexdigest()


def render(file: CatalogueFile) -> str:
    """A version file's text: one device a line, so what a new version changes reads well
    in a diff."""
    lines = [
        f"    {msgspec.json.encode(name).decode()}: "
        f"{msgspec.json.encode(d, order='sorted').decode()}"
        for name, d in sorted(file.devices.items())
    ]
    return (
        "{\n"
        f'  "version": {file.version},\n'
        f'  "source": {msgspec.json.encode(file.source).decode()},\n'
        '  "devices": {\n' + ",\n".join(lines) + "\n  }\n}\n"
    )


@functools.lru_cache(maxsize=32)
def _read(path: Path, _mtime_ns: int, _size: int) -> DeviceCatalogue:
    """One file, read once while it stays as it is."""
    try:
        file = msgspec.json.decode(path.read_bytes(), type=CatalogueFile)
    except msgspec.DecodeError as err:
        raise CatalogueBroken(f"{path}: not a device catalogue ({err})") from None
    if path.name != f"{file.version}.json":
        raise CatalogueBroken(f"{path}: holds version {file.version}")
    return DeviceCatalogue(
        version=file.version, source=file.source, sha256=content_sha256(file), devices=file.devices
    )


@dataclass(frozen=True)
class ShippedCatalogues:
    """The catalogue versions a process has: the files of ``directory`` (the package's own
    unless told otherwise), listed afresh on every call, so a version added while it runs
    is offered without a restart."""

    directory: Path = CATALOGUE_DIR

    def versions(self) -> list[int]:
        try:
            names = [p.name for p in self.directory.iterdir()]
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for name in names if (m := _FILE.match(name)))

    def get(self, version: int) -> DeviceCatalogue | None:
        path = self.directory / f"{version}.json"
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        return _read(path, stat.st_mtime_ns, stat.st_size)

    def newest(self) -> DeviceCatalogue | None:
        versions = self.versions()
        return self.get(versions[-1]) if versions else None

    def exactly(self, ref: CatalogueVersion) -> DeviceCatalogue | None:
        """The version ``ref`` names with the content it names, or ``None``."""
        found = self.get(ref.version)
        return found if found is not None and found.sha256 == ref.sha256 else None

    def describe(self) -> str:
        """What this process ships, for messages: "versions 1-3", "version 1", "none"."""
        versions = self.versions()
        if not versions:
            return f"no version (none in {self.directory})"
        if len(versions) == 1:
            return f"version {versions[0]}"
        return f"versions {', '.join(map(str, versions))}"
