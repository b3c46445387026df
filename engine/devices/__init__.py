"""Device catalogue versions: which one is in use (a fact of the log) and taking a newer one."""

from engine.devices.service import DeviceCatalogues

__all__ = ["DeviceCatalogues"]
