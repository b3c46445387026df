"""Runner presence, kept in the ``tb_runners`` KV bucket with a TTL of about three beats.

Fields added later have defaults, so an entry written by an older runner still decodes.
"""

from __future__ import annotations

import msgspec

from schemas.labels import Labels
from schemas.values import BrowserName, OsName


class RunnerPresence(msgspec.Struct, frozen=True, kw_only=True):
    runner_id: str
    os: OsName
    browser: BrowserName
    slots: int  # capacity: flows it runs at once
    running: int = 0
    completed: int = 0
    failed: int = 0
    status: str = "online"  # online | draining
    hostname: str = ""
    version: str = ""
    last_heartbeat: str = ""  # ISO 8601 UTC
    browser_version: str = ""  # as the launched browser reports it; "" without a browser
    labels: Labels = msgspec.field(default_factory=dict)
    started_at: str = ""  # ISO 8601 UTC: when this runner registered
