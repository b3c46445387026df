"""The pure rules of identity: throttling, the user decider, passwords, session expiry
and what an API key may do."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.errors import Conflict, Invalid, NotFound
from engine.identity.api_keys import role_of_key
from engine.identity.passwords import checked_password, hash_password, verify_password
from engine.identity.sessions import Session, SessionPolicy, expiry_reason
from engine.identity.throttle import Policy, Throttle
from engine.identity.users import (
    ChangeRole,
    CreateUser,
    DisableUser,
    EnableUser,
    Meta,
    User,
    decide,
    evolve,
    user_id_for,
)
from schemas.events import UserCreated

META = Meta(id="e1", at=datetime(2026, 1, 1, tzinfo=UTC), actor="admin")

Step = tuple[str, float]  # ("fail" | "ok", seconds later)
steps = st.lists(
    st.tuples(st.sampled_from(["fail", "fail", "fail", "ok"]), st.floats(0, 100)), max_size=60
)


@given(steps)
def test_the_wait_grows_with_failures_in_a_row_is_capped_and_a_success_clears_it(
    script: list[Step],
) -> None:
    policy = Policy(free=4, base=1.0, cap=900.0)
    throttle, now, in_a_row, last_wait = Throttle(policy), 0.0, 0, 0.0
    for what, later in script:
        now += later
        if what == "ok":
            throttle.succeed(["k"])
            in_a_row, last_wait = 0, 0.0
            assert throttle.wait(["k"], now) == 0
            continue
        wait = throttle.fail(["k"], now)
        in_a_row += 1
        assert 0 <= wait <= policy.cap
        if in_a_row < policy.free:
            assert wait == 0  # the first few wrong passwords cost nothing
        else:
            assert wait >= last_wait  # every further failure waits at least as long
        last_wait = wait


def test_twenty_failures_at_one_instant_wait_from_the_fifth_on_doubling() -> None:
    throttle = Throttle(Policy(free=4, base=1.0, cap=900.0))
    waits = []
    for _ in range(20):
        if throttle.wait(["k"], 0.0):
            waits.append(throttle.fail(["k"], 0.0))
        else:
            throttle.fail(["k"], 0.0)
    assert len(waits) == 16 and waits[:4] == [2.0, 4.0, 8.0, 16.0] and waits[-1] == 900.0


def test_the_oldest_keys_are_forgotten_beyond_the_size() -> None:
    throttle = Throttle(Policy(free=1), size=3)
    for key in "abcd":
        throttle.fail([key], 0.0)
    assert throttle.wait(["a"], 0.0) == 0 and throttle.wait(["d"], 0.0) > 0


def test_a_user_is_created_once_under_an_id_from_its_lower_cased_name() -> None:
    (created,) = decide(User(), CreateUser("Alice", "operator"), META)
    assert isinstance(created, UserCreated) and created.user_id == user_id_for("alice")
    user = evolve(User(), created, 7)
    with pytest.raises(Conflict):
        decide(user, CreateUser("alice", "viewer"), META)
    assert decide(user, ChangeRole("operator"), META) == []  # no change, no event
    disabled = evolve(user, decide(user, DisableUser(), META)[0], 8)
    assert disabled.disabled and decide(disabled, DisableUser(), META) == []
    assert not evolve(disabled, decide(disabled, EnableUser(), META)[0], 9).disabled
    with pytest.raises(NotFound):
        decide(User(), ChangeRole("admin"), META)
    with pytest.raises(Invalid) as bad:
        decide(User(), CreateUser("no spaces", "viewer"), META)
    assert bad.value.field == "username"


@pytest.mark.parametrize("length", [0, 11, 1025])
def test_a_password_outside_12_to_1024_characters_is_refused_naming_the_rule(length: int) -> None:
    with pytest.raises(Invalid) as refused:
        checked_password("p" * length)
    assert refused.value.field == "password" and "12 to 1024" in refused.value.rule


async def test_passwords_are_argon2id_at_owasps_minimum_and_unknown_users_cost_the_same() -> None:
    stored = await hash_password("correct horse battery")
    assert stored.startswith("$argon2id$") and "m=19456,t=2,p=1" in stored
    assert await verify_password(stored, "correct horse battery")
    assert not await verify_password(stored, "wrong horse battery!")
    assert not await verify_password(None, "correct horse battery")  # the dummy hash
    assert not await verify_password("not a hash", "x" * 12)


def test_a_session_ends_at_its_absolute_expiry_or_after_idle_plus_grace() -> None:
    policy = SessionPolicy(max_age=100, idle=30, grace=5)
    session = Session(
        session_id="s", user_id="u", kind="interactive", created=0, expires_at=100, last_seen=0
    )
    assert expiry_reason(session, 35, policy) is None  # within the grace
    assert expiry_reason(session, 35.5, policy) == "idle"
    fresh = Session(
        session_id="s", user_id="u", kind="interactive", created=0, expires_at=100, last_seen=99
    )
    assert expiry_reason(fresh, 100, policy) == "absolute"


def test_an_api_keys_scopes_narrow_its_users_role_and_never_widen_it() -> None:
    assert role_of_key("admin", []) == "admin"
    assert role_of_key("admin", ["read"]) == "viewer"
    assert role_of_key("admin", ["read", "write"]) == "operator"
    assert role_of_key("viewer", ["write"]) == "viewer"
    assert role_of_key("viewer", ["admin"]) == "viewer"
    assert role_of_key("operator", ["logs"]) is None  # log ingest only
