"""API keys: ``tbk.<key_id>.<secret>``, shown once; the bucket keeps the sha256 of the
secret under the key id, so a lookup is by id and the compare is constant-time.

A key acts for the user who made it, with that user's role at most; its scopes can only
narrow that: ``read`` (viewer), ``write`` (operator), ``logs`` (log ingest only).
Every replica follows the bucket with a watch, so a revoked key stops working on all.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

import msgspec
import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from engine.errors import Invalid
from engine.identity.users import ROLES
from engine.kv_mirror import KvMirror
from schemas.events import Role
from schemas.ids import is_valid_id, short_id

KEY_PREFIX = "tbk"
SCOPES: dict[str, Role | None] = {
    "read": "viewer",
    "write": "operator",
    "admin": "admin",
    "logs": None,
}
SCOPES_RULE = f"each scope must be one of {', '.join(SCOPES)}"


class ApiKey(msgspec.Struct, frozen=True, kw_only=True):
    key_id: str
    user_id: str
    name: str
    scopes: list[str]
    created: float
    secret_sha256: str


def checked_scopes(scopes: list[str]) -> list[str]:
    if any(s not in SCOPES for s in scopes):
        raise Invalid("scopes", SCOPES_RULE)
    return sorted(set(scopes))


def role_of_key(user_role: Role, scopes: list[str]) -> Role | None:
    """The role a key acts with: its user's, narrowed by its scopes (``None``: no user
    role at all, a key for log ingest only)."""
    if not scopes:
        return user_role
    granted = [r for s in scopes if (r := SCOPES[s]) is not None]
    if not granted:
        return None
    widest = max(granted, key=ROLES.index)  # ROLES goes from least to most
    return widest if ROLES.index(widest) <= ROLES.index(user_role) else user_role


def may_ingest(scopes: list[str]) -> bool:
    return not scopes or "logs" in scopes


def looks_like_key(value: str) -> bool:
    return value.startswith(KEY_PREFIX + ".")


def _sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


_decode = msgspec.json.Decoder(ApiKey).decode


def _decoded(value: bytes) -> ApiKey | None:
    try:
        return _decode(value)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None  # a record nobody can read grants nothing


@dataclass
class ApiKeys:
    kv: KeyValue
    held: KvMirror[ApiKey] = field(init=False)

    def __post_init__(self) -> None:
        self.held = KvMirror(self.kv, _decode, "api_keys")

    async def start(self) -> None:
        await self.held.start()

    async def stop(self) -> None:
        await self.held.stop()

    async def create(
        self, user_id: str, name: str, scopes: list[str], now: float
    ) -> tuple[str, ApiKey]:
        key_id = short_id("key")
        secret = secrets.token_urlsafe(32)
        record = ApiKey(
            key_id=key_id,
            user_id=user_id,
            name=name,
            scopes=checked_scopes(scopes),
            created=now,
            secret_sha256=_sha(secret),
        )
        await self.kv.create(key_id, msgspec.json.encode(record))
        self.held.hold(key_id, record)
        return f"{KEY_PREFIX}.{key_id}.{secret}", record

    async def find(self, key: str) -> ApiKey | None:
        """The key's record if ``key`` is a live key (a key made a moment ago on another
        replica is read from the bucket)."""
        prefix, _, rest = key.partition(".")
        key_id, _, secret = rest.partition(".")
        if prefix != KEY_PREFIX or not is_valid_id(key_id) or not secret:
            return None
        record = self.held.get(key_id)
        if record is None:
            try:
                entry = await self.kv.get(key_id)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.BadRequestError):
                return None
            if not entry.value or (record := _decoded(entry.value)) is None:
                return None
        if not hmac.compare_digest(_sha(secret), record.secret_sha256):
            return None
        return record

    async def exists(self, key_id: str) -> bool:
        """Whether the key is live (one made a moment ago on another replica is read from
        the bucket)."""
        if self.held.get(key_id) is not None:
            return True
        try:
            entry = await self.kv.get(key_id)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.BadRequestError):
            return False
        return bool(entry.value)

    def get(self, key_id: str) -> ApiKey | None:
        return self.held.get(key_id)

    def listed(self, user_id: str | None = None) -> list[ApiKey]:
        keys = [k for _, k in self.held.items() if user_id is None or k.user_id == user_id]
        return sorted(keys, key=lambda k: k.created)

    async def revoke(self, key_id: str) -> None:
        await self.kv.delete(key_id)
        self.held.forget(key_id)
