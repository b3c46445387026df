"""User commands at the edge: load the user, decide, append with optimistic concurrency;
password hashes go to the credentials bucket, never into an event."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import nats.js.errors
from nats.js.kv import KeyValue

from engine.bus import Appended, Bus, ConcurrencyConflict, Expect, retry_on_conflict
from engine.errors import Conflict
from engine.identity.buckets import CREDENTIALS_BUCKET, bucket
from engine.identity.passwords import checked_password, hash_password, verify_password
from engine.identity.users import (
    LAST_ADMIN,
    ChangeRole,
    CreateUser,
    DisableUser,
    EnableUser,
    Meta,
    SetPassword,
    User,
    UserCommand,
    checked_username,
    decide,
    fold,
    is_active_admin,
    takes_an_admin_away,
    user_id_for,
)
from schemas import subjects
from schemas.events import Role, TbEvent
from schemas.ids import new_id, utcnow


@dataclass
class UserCommands:
    bus: Bus
    clock: Callable[[], datetime] = utcnow
    _credentials: KeyValue | None = None

    async def credentials(self) -> KeyValue:
        if self._credentials is None:
            self._credentials = await bucket(self.bus, CREDENTIALS_BUCKET)
        return self._credentials

    async def load(self, user_id: str) -> User:
        envelopes = await self.bus.load(subjects.user_stream_filter(user_id))
        return fold([(e.seq, e.event) for e in envelopes])

    async def by_name(self, username: str) -> User:
        return await self.load(user_id_for(username))

    async def any_user(self) -> bool:
        await self.credentials()  # the bucket exists
        return bool(await self.bus.kv_keys(CREDENTIALS_BUCKET))

    async def _append(self, user: User, events: list[TbEvent], command_id: str) -> Appended:
        stream_filter = subjects.user_stream_filter(user.user_id)
        appended = Appended(seq=user.version, duplicate=True)
        for n, event in enumerate(events):
            expect = Expect(stream_filter, user.version) if n == 0 else None
            appended = await self.bus.append(
                event, msg_id=subjects.command_msg_id(command_id, n), expect=expect
            )
        return appended

    async def execute(self, user_id: str, cmd: UserCommand, actor: str) -> User:
        command_id = new_id()

        async def attempt() -> User:
            user = await self.load(user_id)
            events = decide(user, cmd, Meta(new_id(), self.clock(), actor))
            await self._append(user, events, command_id)
            return await self.load(user_id)

        return await retry_on_conflict(attempt)

    async def create(self, username: str, password: str, role: Role, actor: str) -> User:
        """A new user; the name is unique across replicas (its id is derived from it)."""
        username = checked_username(username)
        checked_password(password)
        user_id = user_id_for(username)
        hashed = await hash_password(password)
        events = decide(User(), CreateUser(username, role), Meta(new_id(), self.clock(), actor))
        try:
            await self._append(User(user_id=user_id), events, new_id())
        except ConcurrencyConflict:
            raise Conflict("username", f"a user named {username} exists") from None
        kv = await self.credentials()
        await kv.put(user_id, hashed.encode())
        await self.execute(user_id, SetPassword(reset=False), actor)
        return await self.load(user_id)

    async def set_password(self, user_id: str, password: str, actor: str, *, reset: bool) -> None:
        checked_password(password)
        hashed = await hash_password(password)
        user = await self.load(user_id)
        decide(user, SetPassword(reset=reset), Meta("", self.clock(), actor))  # exists?
        kv = await self.credentials()
        await kv.put(user_id, hashed.encode())
        await self.execute(user_id, SetPassword(reset=reset), actor)

    async def change_role(self, user_id: str, role: Role, actor: str) -> User:
        return await self._keeping_an_admin(user_id, ChangeRole(role), actor)

    async def disable(self, user_id: str, actor: str, reason: str = "") -> User:
        return await self._keeping_an_admin(user_id, DisableUser(reason), actor)

    async def _keeping_an_admin(
        self, user_id: str, cmd: ChangeRole | DisableUser, actor: str
    ) -> User:
        """A command that may take an admin away: decided against every user and appended
        expecting no user event since, so two admins removing each other at once (on
        one replica or two) cannot both succeed and leave nobody to manage users."""
        if not takes_an_admin_away(await self.load(user_id), cmd):
            return await self.execute(user_id, cmd, actor)
        command_id, every_user = new_id(), subjects.all_users()

        async def attempt() -> User:
            envelopes = await self.bus.load(every_user)
            histories: dict[str, list[tuple[int, TbEvent]]] = {}
            for envelope in envelopes:
                histories.setdefault(envelope.subject.split(".")[2], []).append(
                    (envelope.seq, envelope.event)
                )
            users = {uid: fold(history) for uid, history in histories.items()}
            user = users.get(user_id, User())
            events = decide(user, cmd, Meta(new_id(), self.clock(), actor))
            if takes_an_admin_away(user, cmd) and not any(
                is_active_admin(other) for uid, other in users.items() if uid != user_id
            ):
                raise Conflict("user_id", LAST_ADMIN)
            last_seq = envelopes[-1].seq if envelopes else 0
            for n, event in enumerate(events):
                expect = Expect(every_user, last_seq) if n == 0 else None
                msg_id = subjects.command_msg_id(command_id, n)
                await self.bus.append(event, msg_id=msg_id, expect=expect)
            return await self.load(user_id)

        return await retry_on_conflict(attempt)

    async def enable(self, user_id: str, actor: str) -> User:
        return await self.execute(user_id, EnableUser(), actor)

    async def check_password(self, username: str, password: str) -> tuple[User, bool]:
        """The user the name belongs to (``exists`` False if none) and whether the password
        is theirs; an unknown name costs as much time as a known one."""
        user_id = user_id_for(username)
        kv = await self.credentials()
        try:
            entry = await kv.get(user_id)
            stored = (entry.value or b"").decode() or None
        except nats.js.errors.KeyNotFoundError:
            stored = None
        ok = await verify_password(stored, password)
        user = await self.load(user_id)  # read for a name nobody has too: the same work
        return user, ok and user.exists
