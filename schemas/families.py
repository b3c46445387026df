"""Operating system and browser families: where a runner runs, and what a device presents.

A runner runs on ``OsName`` with a ``BrowserName``; a device profile presents an
``DeviceOs`` (phones and tablets too) and a browser family, which its descriptor's
User-Agent and default browser type say unless the profile names them.
"""

from __future__ import annotations

from typing import Literal

OsName = Literal["linux", "windows", "macos"]
BrowserName = Literal["chromium", "firefox", "webkit"]
DeviceOs = Literal["windows", "macos", "linux", "android", "ios"]

# User-Agent marks, most specific first: an iPad says "like Mac OS X", a Windows Phone
# says "Android", a Kindle's Silk says "Linux"
_UA_OS: tuple[tuple[str, DeviceOs | None], ...] = (
    ("iPhone", "ios"),
    ("iPad", "ios"),
    ("iPod", "ios"),
    ("Windows Phone", None),
    ("Android", "android"),
    ("Silk/", "android"),
    ("Windows", "windows"),
    ("Macintosh", "macos"),
    ("Mac OS X", "macos"),
    ("CrOS", None),
    ("Linux", "linux"),
    ("X11", "linux"),
)


def os_of_user_agent(user_agent: str) -> DeviceOs | None:
    """The operating system family a User-Agent claims; ``None`` for one we do not name
    (BlackBerry, Windows Phone, MeeGo, ChromeOS)."""
    for mark, family in _UA_OS:
        if mark in user_agent:
            return family
    return None
