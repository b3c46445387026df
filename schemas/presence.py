"""Runner presence, kept in the ``tb_runners`` KV bucket with a TTL of about three beats."""

from __future__ import annotations

import msgspec

from schemas.values import BrowserName, OsName


class RunnerPresence(msgspec.Struct, frozen=True, kw_only=True):
    runner_id: str
    os: OsName
    browser: BrowserName
    slots: int
    running: int = 0
    completed: int = 0
    failed: int = 0
    status: str = "online"  # online | draining
    hostname: str = ""
    version: str = ""
    last_heartbeat: str = ""  # ISO 8601 UTC
