"""Who sees which dataset, through the real handlers: the caller's principal is put on
each request as the identity middleware does (``scope["user"]``), named by a header."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from api.app import create_app
from api.authz import PRINCIPAL_SCOPE_KEY, Principal
from api.services import ApiConfig
from schemas.events import Role
from tests.conftest import NatsServer
from tests.datasets import upload

ROLES: dict[str, Role] = {"ann": "operator", "bob": "operator", "cy": "viewer", "root": "admin"}


def with_principals(app: Any) -> Any:
    """The app, with the caller named by ``X-As`` put on the request as its principal."""

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            name = dict(scope["headers"]).get(b"x-as", b"").decode()
            if name:
                scope[PRINCIPAL_SCOPE_KEY] = Principal(
                    user_id=name, username=name, role=ROLES[name], plan="enterprise", via="session"
                )
        await app(scope, receive, send)

    return asgi


@pytest.fixture
async def clients(
    nats_server: NatsServer, tmp_path: Path
) -> AsyncIterator[dict[str, AsyncTestClient]]:
    app = create_app(ApiConfig(nats_url=nats_server.url, db_path=tmp_path / "read.db"))
    async with AsyncTestClient(app=with_principals(app)) as client:
        yield {name: _As(client, name) for name in ROLES}  # type: ignore[misc]


class _As:
    """One client, speaking as one user."""

    def __init__(self, client: AsyncTestClient, name: str) -> None:
        self.client, self.headers = client, {"X-As": name}

    async def get(self, url: str, **kw: Any) -> Any:
        return await self.client.get(url, headers=self.headers, **kw)

    async def post(self, url: str, **kw: Any) -> Any:
        return await self.client.post(url, headers=self.headers, **kw)

    async def put(self, url: str, **kw: Any) -> Any:
        return await self.client.put(url, headers=self.headers, **kw)

    async def patch(self, url: str, **kw: Any) -> Any:
        return await self.client.patch(url, headers=self.headers, **kw)

    async def delete(self, url: str, **kw: Any) -> Any:
        return await self.client.delete(url, headers=self.headers, **kw)


async def test_a_non_owner_sees_nothing_until_it_is_shared_and_never_changes_it(
    clients: dict[str, Any],
) -> None:
    ann, bob, cy, root = (clients[n] for n in ("ann", "bob", "cy", "root"))
    proxies = b"http://u:Pw-of-ann@10.0.0.1:3128\n"
    status, made = await upload(ann, proxies, kind="proxies", fmt="txt")
    assert status == 201, made
    did, seq = made["dataset_id"], made["seq"]
    one = f"/api/v1/datasets/{did}"

    assert (await bob.get(one, params={"min_seq": seq})).status_code == 404
    assert (await bob.get("/api/v1/datasets")).json() == []
    assert (await bob.get(f"{one}/versions/1")).status_code == 404
    assert (await bob.patch(one, json={"name": "mine"})).status_code == 404
    assert (await root.get(one)).json()["owner"] == "ann"  # admins see all
    assert [d["dataset_id"] for d in (await root.get("/api/v1/datasets")).json()] == [did]

    shared = await ann.put(f"{one}/shares/bob")
    assert shared.status_code == 200, shared.text
    assert (await bob.get(one, params={"min_seq": shared.json()["seq"]})).status_code == 200
    assert [d["dataset_id"] for d in (await bob.get("/api/v1/datasets")).json()] == [did]
    assert (await cy.get(one)).status_code == 404  # shared with bob, not with cy
    renamed = await bob.patch(one, json={"name": "mine"})
    assert renamed.status_code == 403 and renamed.json()["field"] == "dataset_id"
    assert (await bob.delete(one)).status_code == 403
    assert (await bob.put(f"{one}/shares/cy")).status_code == 403
    masked = await bob.get(f"{one}/versions/1")
    assert masked.status_code == 200 and b"Pw-of-ann" not in masked.content
    shown = await bob.get(f"{one}/versions/1", params={"passwords": "show"})
    assert shown.status_code == 403 and shown.json()["field"] == "passwords"
    assert b"Pw-of-ann" in (await ann.get(f"{one}/versions/1?passwords=show")).content

    version = await bob.post(
        "/api/v1/datasets/uploads",
        json={"name": "x", "kind": "proxies", "format": "txt", "size": 1, "sha256": "0" * 64,
              "dataset_id": did},
    )  # fmt: skip
    assert version.status_code == 403
    # another's upload is not there for bob
    started = await ann.post(
        "/api/v1/datasets/uploads",
        json={"name": "x", "kind": "targets", "format": "txt", "size": 1, "sha256": "0" * 64},
    )
    upload_id = started.json()["upload_id"]
    assert (await bob.get(f"/api/v1/datasets/uploads/{upload_id}")).status_code == 404
    assert (
        await bob.put(f"/api/v1/datasets/uploads/{upload_id}/chunks/0", content=b"x")
    ).status_code == 404
    assert (await root.get(f"/api/v1/datasets/uploads/{upload_id}")).status_code == 200

    unshared = await ann.delete(f"{one}/shares/bob")
    assert unshared.status_code == 200
    assert (await bob.get(one, params={"min_seq": unshared.json()["seq"]})).status_code == 404
    assert (await root.delete(one)).status_code == 200  # an admin may delete it
