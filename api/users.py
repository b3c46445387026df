"""Users (admin only) and API keys (each user their own; an admin sees all)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, delete, get, patch, post
from litestar.params import JSONBody, PathParameter

from api.authz import Principal, access, principal_of
from api.identity import identity_of
from api.openapi import problems
from api.services import Services
from engine.errors import Conflict, Invalid, NotFound
from engine.identity.api_keys import SCOPES
from engine.identity.users import User
from projections import users as users_read
from schemas.events import ApiKeyCreated, ApiKeyRevoked, Role
from schemas.ids import ID_RULE, is_valid_id, new_id, utcnow

Username = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Password = Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
KeyName = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Scope = Annotated[str, msgspec.Meta(max_length=64)]
UserIdPath = Annotated[str, PathParameter(description=f"a user id: {ID_RULE}")]
KeyIdPath = Annotated[str, PathParameter(description=f"an API key id: {ID_RULE}")]


class UserIn(msgspec.Struct, forbid_unknown_fields=True):
    username: Username
    password: Password
    role: Role = "viewer"


class UserPatch(msgspec.Struct, forbid_unknown_fields=True):
    role: Role | None = None
    disabled: bool | None = None


class PasswordIn(msgspec.Struct, forbid_unknown_fields=True):
    password: Password


class UserOut(msgspec.Struct):
    user_id: str
    username: str
    role: str
    disabled: bool
    created_at: str | None = None
    last_login_at: str | None = None


class ApiKeyIn(msgspec.Struct, forbid_unknown_fields=True):
    name: KeyName
    scopes: Annotated[list[Scope], msgspec.Meta(max_length=len(SCOPES))] = []


class ApiKeyCreatedOut(msgspec.Struct):
    key_id: str
    key: str  # shown this once; only its hash is kept
    name: str
    scopes: list[str]


class ApiKeyOut(msgspec.Struct):
    key_id: str
    user_id: str
    name: str
    scopes: list[str]
    created: float


def _out(user: User) -> UserOut:
    return UserOut(
        user_id=user.user_id, username=user.username, role=user.role, disabled=user.disabled
    )


def _checked_id(field: str, value: str) -> str:
    if not is_valid_id(value):
        raise Invalid(field, ID_RULE)
    return value


def _caller(request: Request[Any, Any, Any]) -> Principal:
    principal = principal_of(request)
    assert principal is not None  # the access guard let only a user through
    return principal


class UsersController(Controller):
    path = "/api/v1/users"
    tags = ["users"]
    opt = access("admin")

    @get("/", summary="Every user", responses=problems(401, 403, 503))
    async def list_users(self, request: Request[Any, Any, Any]) -> list[UserOut]:
        services: Services = request.app.state.services
        rows = await users_read.users(services.db)
        return [UserOut(**msgspec.structs.asdict(row)) for row in rows]

    @post(
        "/", status_code=201, summary="Create a user", responses=problems(400, 401, 403, 409, 503)
    )
    async def create_user(self, request: Request[Any, Any, Any], data: JSONBody[UserIn]) -> UserOut:
        identity = identity_of(request)
        user = await identity.users.create(
            data.username, data.password, data.role, actor=_caller(request).user_id
        )
        return _out(user)

    @patch(
        "/{user_id:str}",
        summary="Change a user's role, or disable (ending their sessions and keys) or enable them",
        responses=problems(400, 401, 403, 404, 409, 503),
    )
    async def update_user(
        self, request: Request[Any, Any, Any], user_id: UserIdPath, data: JSONBody[UserPatch]
    ) -> UserOut:
        identity, actor = identity_of(request), _caller(request).user_id
        user_id = _checked_id("user_id", user_id)
        user = await identity.users.load(user_id)
        if not user.exists:
            raise NotFound("user_id", f"no user {user_id}")
        if user_id == actor and (data.disabled or data.role not in (None, "admin")):
            # an admin who locks themselves out may leave nobody to let them back in
            raise Conflict("user_id", "an admin cannot disable or demote themselves")
        if data.role is not None:
            user = await identity.users.change_role(user_id, data.role, actor)
        if data.disabled is True:
            user = await identity.users.disable(user_id, actor)
            await identity.end_sessions(user_id, "disabled", actor, interactive_only=False)
        elif data.disabled is False:
            user = await identity.users.enable(user_id, actor)
        return _out(user)

    @post(
        "/{user_id:str}/password",
        status_code=204,
        summary="Set a user's password (their sessions end)",
        responses=problems(400, 401, 403, 404, 503),
    )
    async def reset_password(
        self, request: Request[Any, Any, Any], user_id: UserIdPath, data: JSONBody[PasswordIn]
    ) -> None:
        identity, actor = identity_of(request), _caller(request).user_id
        user_id = _checked_id("user_id", user_id)
        if not (await identity.users.load(user_id)).exists:
            raise NotFound("user_id", f"no user {user_id}")
        await identity.users.set_password(user_id, data.password, actor, reset=True)
        await identity.end_sessions(user_id, "password reset", actor)


class ApiKeysController(Controller):
    path = "/api/v1/api-keys"
    tags = ["api keys"]
    opt = access("viewer")

    @post(
        "/",
        status_code=201,
        summary="A new API key acting for the caller (the key is shown this once)",
        responses=problems(400, 401, 403, 503),
    )
    async def create_key(
        self, request: Request[Any, Any, Any], data: JSONBody[ApiKeyIn]
    ) -> ApiKeyCreatedOut:
        identity, caller = identity_of(request), _caller(request)
        if caller.via == "api_key":
            raise Invalid("Authorization", "an API key cannot make API keys: log in")
        key, record = await identity.keys.create(
            caller.user_id, data.name, data.scopes, identity.clock()
        )
        event = ApiKeyCreated(
            id=new_id(),
            at=utcnow(),
            actor=caller.user_id,
            user_id=caller.user_id,
            key_id=record.key_id,
            name=record.name,
            scopes=record.scopes,
        )
        await identity.bus.append(event, msg_id=event.id)
        return ApiKeyCreatedOut(
            key_id=record.key_id, key=key, name=record.name, scopes=record.scopes
        )

    @get(
        "/", summary="The caller's API keys (an admin sees every key)", responses=problems(401, 503)
    )
    async def list_keys(self, request: Request[Any, Any, Any]) -> list[ApiKeyOut]:
        identity, caller = identity_of(request), _caller(request)
        records = identity.keys.listed(None if caller.role == "admin" else caller.user_id)
        return [
            ApiKeyOut(
                key_id=r.key_id, user_id=r.user_id, name=r.name, scopes=r.scopes, created=r.created
            )
            for r in records
        ]

    @delete(
        "/{key_id:str}",
        status_code=204,
        summary="Revoke an API key (it stops working on every replica)",
        responses=problems(400, 401, 403, 404, 503),
    )
    async def revoke_key(
        self, request: Request[Any, Any, Any], key_id: KeyIdPath
    ) -> Response[None]:
        identity, caller = identity_of(request), _caller(request)
        record = identity.keys.get(_checked_id("key_id", key_id))
        if record is None or (caller.role != "admin" and record.user_id != caller.user_id):
            raise NotFound("key_id", f"no API key {key_id}")
        await identity.keys.revoke(record.key_id)
        event = ApiKeyRevoked(
            id=new_id(), at=utcnow(), actor=caller.user_id, user_id=record.user_id, key_id=key_id
        )
        await identity.bus.append(event, msg_id=event.id)
        return Response(None, status_code=204)
