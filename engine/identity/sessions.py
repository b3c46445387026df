"""Server-side sessions in the ``tb_sessions`` bucket, keyed by the sha256 of the token.

Every API replica keeps the bucket in memory through a watch: a session ended on one
replica (logout, a new login, an admin disabling the user, the cleaner) is gone from
every replica's cache as soon as the delete reaches it, and listeners (open live
sockets) hear of it. The token itself is never stored; the session id, a separate
random id, is what events and logs name.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from engine.kv_mirror import KvMirror
from schemas.events import SessionKind

TOKEN_PREFIX = "tbs_"


class Session(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    user_id: str
    kind: SessionKind
    created: float  # epoch seconds
    expires_at: float  # absolute expiry
    last_seen: float


@dataclass(frozen=True)
class SessionPolicy:
    """``max_age``: absolute lifetime; ``idle``: unused this long, a session ends, after
    ``grace`` more (a dashboard that lost its connection a moment keeps its session);
    ``touch_every``: last-seen is written at most this often."""

    max_age: float = 8 * 3600.0
    idle: float = 30 * 60.0
    grace: float = 30.0
    touch_every: float = 5.0


def expiry_reason(session: Session, now: float, policy: SessionPolicy) -> str | None:
    """Why the session has ended by ``now``, or ``None`` while it is alive."""
    if now >= session.expires_at:
        return "absolute"
    if now - session.last_seen > policy.idle + policy.grace:
        return "idle"
    return None


def token_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


_decode = msgspec.json.Decoder(Session).decode
Ended = Callable[[Session], None]
Started = Callable[[str, Session], None]


def _decoded(value: bytes) -> Session | None:
    try:
        return _decode(value)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None  # a session nobody can read lets nobody in


@dataclass
class Sessions:
    kv: KeyValue
    policy: SessionPolicy = SessionPolicy()
    held: KvMirror[Session] = field(init=False)
    _listeners: list[Ended] = field(default_factory=list)
    _started: list[Started] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.held = KvMirror(
            self.kv, _decode, "sessions", on_put=self._heard, on_delete=self._ended
        )

    async def start(self) -> None:
        await self.held.start()

    async def stop(self) -> None:
        await self.held.stop()

    def on_end(self, listener: Ended) -> None:
        self._listeners.append(listener)

    def on_start(self, listener: Started) -> None:
        """Called for each session this replica first hears of from the bucket (one made
        on another replica, or one that was there when the watch began)."""
        self._started.append(listener)

    def _heard(self, key: str, session: Session, fresh: bool) -> None:
        if fresh:
            for listener in self._started:
                listener(key, session)

    def _ended(self, key: str, session: Session) -> None:
        for listener in self._listeners:
            listener(session)

    def _forget(self, key: str) -> None:
        self.held.forget(key)

    async def create(
        self, user_id: str, session_id: str, kind: SessionKind, now: float
    ) -> tuple[str, Session]:
        token = new_token()
        session = Session(
            session_id=session_id,
            user_id=user_id,
            kind=kind,
            created=now,
            expires_at=now + self.policy.max_age,
            last_seen=now,
        )
        key = token_key(token)
        await self.kv.put(key, msgspec.json.encode(session))
        self.held.hold(key, session)
        return token, session

    async def find(self, token: str, now: float) -> Session | None:
        """The live session of this token; one made a moment ago on another replica is
        read from the bucket when the watch has not brought it yet."""
        key = token_key(token)
        session = self.held.get(key)
        if session is None:
            try:
                entry = await self.kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                return None
            if not entry.value or (session := _decoded(entry.value)) is None:
                return None
        if expiry_reason(session, now, self.policy) is not None:
            return None
        if now - session.last_seen >= self.policy.touch_every:
            return await self._touch(key, now)
        return session

    async def _touch(self, key: str, now: float) -> Session | None:
        """Last-seen moves on only if the session is still stored: a write must never bring
        back a session another replica has just ended."""
        try:
            entry = await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            self._forget(key)
            return None
        if not entry.value or (stored := _decoded(entry.value)) is None:
            return None
        session = msgspec.structs.replace(stored, last_seen=now)
        with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
            await self.kv.update(key, msgspec.json.encode(session), last=entry.revision)
            self.held.hold(key, session)
        return session

    def of_user(self, user_id: str) -> list[tuple[str, Session]]:
        return [(k, s) for k, s in self.held.items() if s.user_id == user_id]

    def expired(self, now: float) -> list[tuple[str, Session, str]]:
        return [
            (k, s, reason)
            for k, s in list(self.held.items())
            if (reason := expiry_reason(s, now, self.policy)) is not None
        ]

    async def end(self, key: str) -> None:
        await self.kv.delete(key)
        self._forget(key)

    async def end_token(self, token: str) -> Session | None:
        key = token_key(token)
        session = self.held.get(key)
        await self.end(key)
        return session
