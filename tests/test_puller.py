"""How much a puller asks the server for: its requests, with the server played by the test."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from nats.aio.msg import Msg

from engine.puller import Puller


class Server:
    """Records the pull requests a puller publishes; the test delivers what it likes."""

    def __init__(self) -> None:
        self.requests: list[tuple[int, str]] = []  # (batch, reply subject)
        self.delivered = 0

    def new_inbox(self) -> str:
        return "_INBOX.t"

    async def subscribe(self, subject: str, cb: Any) -> object:
        return object()

    async def publish(self, subject: str, payload: bytes, reply: str = "") -> None:
        self.requests.append((msgspec.json.decode(payload)["batch"], reply))

    def asked(self) -> int:
        return sum(batch for batch, _ in self.requests)

    async def deliver(self, puller: Puller, n: int) -> None:
        """The next ``n`` messages of the stream, to the puller (on their stored subject)."""
        for _ in range(n):
            self.delivered += 1
            seq = self.delivered
            reply = f"$JS.ACK.TB.c.1.{seq}.{seq}.0.{1000 - seq}"
            await puller._on_msg(Msg(None, subject="tb.job.j.JobCancelled", reply=reply))  # type: ignore[arg-type]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_reader_ahead_asks_for_two_batches_at_most_whatever_is_still_coming() -> None:
    server = Server()
    puller = await Puller(server, "TB", "c", "$JS.API", read_ahead=True).start()  # type: ignore[arg-type]
    fetch = asyncio.create_task(puller.fetch(5, linger=5))
    await settle()
    assert server.asked() == 10  # this batch and the next
    await server.deliver(puller, 5)  # the rest is on its way while the reader works
    assert len(await fetch) == 5
    for _ in range(20):  # a reader as fast as the server: each fetch finds its batch coming
        fetch = asyncio.create_task(puller.fetch(5, linger=5))
        await settle()
        assert server.asked() - server.delivered <= 10
        await server.deliver(puller, 5)
        assert len(await fetch) == 5
    assert server.asked() == server.delivered + 5  # the next batch is on its way


async def test_a_work_queue_puller_asks_for_one_batch() -> None:
    server = Server()
    puller = await Puller(server, "TB", "c", "$JS.API").start()  # type: ignore[arg-type]
    fetch = asyncio.create_task(puller.fetch(5, linger=5))
    await settle()
    assert server.requests == [(5, "_INBOX.t.1")]
    await server.deliver(puller, 5)
    assert len(await fetch) == 5


async def test_a_request_the_server_ends_early_is_no_longer_counted_as_coming() -> None:
    server = Server()
    puller = await Puller(server, "TB", "c", "$JS.API", read_ahead=True).start()  # type: ignore[arg-type]
    fetch = asyncio.create_task(puller.fetch(5, linger=5))
    await settle()
    await server.deliver(puller, 3)  # all there is for now, then "no messages"
    _, reply = server.requests[-1]
    await puller._on_msg(Msg(None, subject=reply, headers={"Status": "404"}))  # type: ignore[arg-type]
    assert len(await fetch) == 3
    fetch = asyncio.create_task(puller.fetch(5, linger=5))
    await settle()
    assert server.requests[-1][0] == 10  # nothing is coming: it asks afresh
    await server.deliver(puller, 5)
    assert len(await fetch) == 5
