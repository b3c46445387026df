"""How the CLI authenticates to the API: one place, so every command sends the same.

``TB_API_KEY`` is sent as ``X-API-Key``; else ``TB_API_TOKEN`` as a Bearer token; else
nothing (an API without identity, or one on loopback that lets the CLI in).
"""

from __future__ import annotations

import os

API_KEY_HEADER = "X-API-Key"


def auth_headers() -> dict[str, str]:
    key = os.environ.get("TB_API_KEY", "").strip()
    if key:
        return {API_KEY_HEADER: key}
    token = os.environ.get("TB_API_TOKEN", "").strip()
    if token:
        return {"Authorization": f"Bearer {token}"}
    return {}
