"""The user aggregate as a pure decider: ``decide(user, cmd, meta) -> events``.

A user's id is derived from the lower-cased username, so creating a user appends to a
subject that must be empty: two replicas creating the same name meet the concurrency
check and only one wins.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from datetime import datetime

from engine.errors import Conflict, Invalid, NotFound
from schemas.events import (
    PasswordChanged,
    Role,
    RoleChanged,
    TbEvent,
    UserCreated,
    UserDisabled,
    UserEnabled,
)

ROLES: tuple[Role, ...] = ("viewer", "operator", "admin")
USERNAME_RULE = "must be 1 to 64 characters of letters, digits and _ . @ -"
LAST_ADMIN = "the last admin cannot be demoted or disabled: make another admin first"
_USERNAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.@-")


def user_id_for(username: str) -> str:
    digest = hashlib.blake2b(username.lower().encode(), digest_size=10).hexdigest()
    return f"user_{digest}"


def checked_username(username: str) -> str:
    if not 1 <= len(username) <= 64 or not set(username) <= _USERNAME_CHARS:
        raise Invalid("username", USERNAME_RULE)
    return username


@dataclass(frozen=True)
class Meta:
    id: str
    at: datetime
    actor: str


@dataclass(frozen=True)
class User:
    user_id: str = ""
    username: str = ""
    role: Role = "viewer"
    disabled: bool = False
    version: int = 0  # stream sequence of the last event applied (0 = none)

    @property
    def exists(self) -> bool:
        return self.version > 0


@dataclass(frozen=True)
class CreateUser:
    username: str
    role: Role


@dataclass(frozen=True)
class ChangeRole:
    role: Role


@dataclass(frozen=True)
class DisableUser:
    reason: str = ""


@dataclass(frozen=True)
class EnableUser:
    pass


@dataclass(frozen=True)
class SetPassword:
    reset: bool = False


UserCommand = CreateUser | ChangeRole | DisableUser | EnableUser | SetPassword


def is_active_admin(user: User) -> bool:
    return user.exists and user.role == "admin" and not user.disabled


def takes_an_admin_away(user: User, cmd: UserCommand) -> bool:
    """Whether ``cmd`` leaves ``user`` no longer an admin who can act."""
    if not is_active_admin(user):
        return False
    return isinstance(cmd, DisableUser) or (isinstance(cmd, ChangeRole) and cmd.role != "admin")


def decide(user: User, cmd: UserCommand, meta: Meta) -> list[TbEvent]:
    if isinstance(cmd, CreateUser):
        if user.exists:
            raise Conflict("username", f"a user named {user.username} exists")
        username = checked_username(cmd.username)
        return [
            UserCreated(
                id=meta.id,
                at=meta.at,
                actor=meta.actor,
                user_id=user_id_for(username),
                username=username,
                role=cmd.role,
            )
        ]
    if not user.exists:
        raise NotFound("user_id", "no such user")
    match cmd:
        case ChangeRole(role=role):
            return (
                []
                if role == user.role
                else [
                    RoleChanged(
                        id=meta.id, at=meta.at, actor=meta.actor, user_id=user.user_id, role=role
                    )
                ]
            )
        case DisableUser(reason=reason):
            return (
                []
                if user.disabled
                else [
                    UserDisabled(
                        id=meta.id,
                        at=meta.at,
                        actor=meta.actor,
                        user_id=user.user_id,
                        reason=reason,
                    )
                ]
            )
        case EnableUser():
            return (
                [UserEnabled(id=meta.id, at=meta.at, actor=meta.actor, user_id=user.user_id)]
                if user.disabled
                else []
            )
        case SetPassword(reset=reset):
            return [
                PasswordChanged(
                    id=meta.id, at=meta.at, actor=meta.actor, user_id=user.user_id, reset=reset
                )
            ]
    raise AssertionError(f"unknown command {cmd!r}")


def evolve(user: User, event: TbEvent, seq: int) -> User:
    match event:
        case UserCreated(user_id=user_id, username=username, role=role):
            user = User(user_id=user_id, username=username, role=role)
        case RoleChanged(role=role):
            user = replace(user, role=role)
        case UserDisabled():
            user = replace(user, disabled=True)
        case UserEnabled():
            user = replace(user, disabled=False)
    return replace(user, version=seq)


def fold(history: list[tuple[int, TbEvent]]) -> User:
    user = User()
    for seq, event in history:
        user = evolve(user, event, seq)
    return user
