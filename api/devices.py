"""The device profiles a job may name: Playwright's device descriptors."""

from __future__ import annotations

from litestar import get

from api.authz import access
from schemas.devices import Device, DeviceProfile, device_names, resolve


@get(
    "/api/v1/devices",
    opt=access("viewer"),
    tags=["jobs"],
    summary="Device profiles a job's settings.devices may name, with what each presents",
    sync_to_thread=False,
)
def list_devices() -> list[Device]:
    """``default`` is the runner's browser as launched (its own User-Agent, 1280x800)."""
    return [resolve(DeviceProfile(name=name)) for name in device_names()]
