"""Who sees which dataset, through the real handlers, as users logged in with their roles."""

from __future__ import annotations

from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from schemas.events import Role
from tests.api_client import ClientAs, client, client_as
from tests.datasets import upload

__all__ = ["client", "client_as"]  # fixtures

ROLES: dict[str, Role] = {"ann": "operator", "bob": "operator", "cy": "viewer"}


@pytest.fixture
async def clients(client: AsyncTestClient, client_as: ClientAs) -> dict[str, AsyncTestClient]:
    """Logged-in users: ann and bob (operators), cy (a viewer) and root (the first admin)."""
    made = {name: await client_as(role) for name, role in ROLES.items()}
    return made | {"root": client}


async def user_id(client: AsyncTestClient) -> str:
    return str((await client.get("/api/v1/auth/me")).json()["user_id"])


async def test_a_non_owner_sees_nothing_until_it_is_shared_and_never_changes_it(
    clients: dict[str, Any],
) -> None:
    ann, bob, cy, root = (clients[n] for n in ("ann", "bob", "cy", "root"))
    ann_id, bob_id, cy_id = [await user_id(c) for c in (ann, bob, cy)]
    proxies = b"http://u:Pw-of-ann@10.0.0.1:3128\n"
    status, made = await upload(ann, proxies, kind="proxies", fmt="txt")
    assert status == 201, made
    did, seq = made["dataset_id"], made["seq"]
    one = f"/api/v1/datasets/{did}"

    assert (await bob.get(one, params={"min_seq": seq})).status_code == 404
    assert (await bob.get("/api/v1/datasets")).json() == []
    assert (await bob.get(f"{one}/versions/1")).status_code == 404
    assert (await bob.patch(one, json={"name": "mine"})).status_code == 404
    assert (await root.get(one)).json()["owner"] == ann_id  # admins see all
    assert [d["dataset_id"] for d in (await root.get("/api/v1/datasets")).json()] == [did]

    shared = await ann.put(f"{one}/shares/{bob_id}")
    assert shared.status_code == 200, shared.text
    assert (await bob.get(one, params={"min_seq": shared.json()["seq"]})).status_code == 200
    assert [d["dataset_id"] for d in (await bob.get("/api/v1/datasets")).json()] == [did]
    assert (await cy.get(one)).status_code == 404  # shared with bob, not with cy
    renamed = await bob.patch(one, json={"name": "mine"})
    assert renamed.status_code == 403 and renamed.json()["field"] == "dataset_id"
    assert (await bob.delete(one)).status_code == 403
    assert (await bob.put(f"{one}/shares/{cy_id}")).status_code == 403
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

    unshared = await ann.delete(f"{one}/shares/{bob_id}")
    assert unshared.status_code == 200
    assert (await bob.get(one, params={"min_seq": unshared.json()["seq"]})).status_code == 404
    assert (await root.delete(one)).status_code == 200  # an admin may delete it
