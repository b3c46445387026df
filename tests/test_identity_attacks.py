"""Attacks on identity that once went through."""

from __future__ import annotations

import asyncio

import pytest

from engine.bus import Bus
from engine.errors import Conflict
from engine.identity.service import UserCommands


@pytest.mark.parametrize("removal", ["demote", "disable"])
async def test_two_admins_removing_each_other_at_once_leave_an_admin(
    bus: Bus, removal: str
) -> None:
    users = UserCommands(bus)
    first, second = [
        (await users.create(name, "a-long-password", "admin", actor="system")).user_id
        for name in ("first", "second")
    ]

    async def remove(user_id: str, actor: str) -> str:
        try:
            if removal == "demote":
                await users.change_role(user_id, "viewer", actor)
            else:
                await users.disable(user_id, actor)
        except Conflict as refused:
            return refused.rule
        return "done"

    outcomes = await asyncio.gather(remove(second, first), remove(first, second))
    assert sorted(outcomes)[0] == "done" and "last admin" in sorted(outcomes)[1], outcomes
    left = [await users.load(u) for u in (first, second)]
    assert [u.user_id for u in left if u.role == "admin" and not u.disabled] != []
    # an admin with no other beside them stays one, whoever asks
    last = next(u.user_id for u in left if u.role == "admin" and not u.disabled)
    assert "last admin" in await remove(last, "system")
