"""Licence commands: assign a plan to a user (``LicenseAssigned`` on the user's subjects).

Appended with optimistic concurrency on ``tb.user.<user_id>.*`` and the command's
msg-id, like every other write: a retry of one assignment (same ``Idempotency-Key``)
answers what it stored, and only a user the log knows (``UserCreated``) gets a plan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from engine.bus import Appended, Bus, Expect, applied_by, retry_on_conflict
from engine.errors import CommandIdReused, Invalid, NotFound
from schemas import subjects
from schemas.events import Envelope, LicenseAssigned, UserCreated
from schemas.ids import ID_RULE, is_valid_id, new_id, utcnow
from schemas.licences import PLANS


def checked_user_id(user_id: str) -> str:
    """The id, if it is one: it becomes a subject token (``tb.user.<user_id>.*``)."""
    if not is_valid_id(user_id):
        raise Invalid("user_id", ID_RULE)
    return user_id


def checked_plan(plan: str) -> str:
    if plan not in PLANS:
        raise Invalid("plan", f"must be one of {', '.join(PLANS)} (got {plan!r})")
    return plan


@dataclass
class LicenceCommands:
    bus: Bus
    clock: Callable[[], datetime] = utcnow

    async def assign(
        self, user_id: str, plan: str, actor: str, command_id: str | None = None
    ) -> Appended:
        """Record that ``user_id`` now runs on ``plan``."""
        scope = subjects.user_stream_filter(checked_user_id(user_id))
        checked_plan(plan)
        command = command_id or new_id()

        async def attempt() -> Appended:
            history = await self.bus.load(scope)
            before = _stored_by(history, command, plan)
            if before is not None:
                return before
            if not any(isinstance(env.event, UserCreated) for env in history):
                raise NotFound("user_id", f"no user {user_id}")
            event = LicenseAssigned(
                id=new_id(), at=self.clock(), actor=actor, user_id=user_id, plan=plan
            )
            last = history[-1].seq if history else 0
            appended = await self.bus.append(
                event, msg_id=subjects.command_msg_id(command), expect=Expect(scope, last)
            )
            if appended.duplicate:  # the server knew the msg-id: this user's, or another's
                stored = _stored_by(await self.bus.load(scope), command, plan)
                if stored is None:
                    raise CommandIdReused("for another user")
                return stored
            return appended

        return await retry_on_conflict(attempt)


def _stored_by(history: list[Envelope], command_id: str, plan: str) -> Appended | None:
    """Where this command stored its assignment before; ``CommandIdReused`` when the id
    stored something else on the user's subjects (another event, or another plan)."""
    before = applied_by(history, command_id)
    if before is None:
        return None
    (stored,) = [env.event for env in history if env.seq == before.seq]
    if not isinstance(stored, LicenseAssigned):
        raise CommandIdReused(type(stored).__name__)
    if stored.plan != plan:
        raise CommandIdReused(f"assigning plan {stored.plan!r}")
    return before
