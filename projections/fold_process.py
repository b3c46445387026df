"""A read model's writer in a process of its own, for a rebuild.

Reading the log (nats-py), decoding and checking each event, and folding it into SQLite
are all Python, and threads of one process take turns at it: a rebuild in one process
takes as long as everything together. Here the reader keeps only what nats-py does and
the rest runs in a child (``python -m projections.fold_process <db>``) on another core:
the reader sends each batch of stored messages, undecoded, down the child's stdin; the
child decodes and checks them as every reader does (``schemas.stored``), applies the
events with ``apply_batch`` (rows and checkpoint in one transaction, as the projector
does) and answers the checkpoint it reached and the messages that were no events, which
the reader quarantines. Frames are a 4-byte length and msgpack.

A child that fails answers what failed and exits; the parent raises ``FoldFailed``. A
parent that goes away closes the child's stdin, and the child ends after its batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import os
import sqlite3
import sys
import traceback
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import msgspec

import projections
from projections.inline import InlineDatabase, as_connection, run_inline
from projections.read_model import apply_batch
from schemas.events import Envelope
from schemas.stored import Undecodable, stored_envelope

HEADER = 4  # bytes of a frame's length, big-endian
WRITE_AHEAD = 8 * 2**20  # bytes of batches sent and not yet taken by the child
PIPE_SIZE = 2**20  # Linux's limit for a process without CAP_SYS_RESOURCE
STOP_GRACE = 10.0  # seconds a child has to end after its stdin closes
# the child runs the code this process runs, whatever else is installed
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(projections.__file__)))


class Stored(msgspec.Struct, array_like=True, frozen=True):
    """A message of the events stream as stored."""

    seq: int
    subject: str
    data: bytes
    headers: Mapping[str, str] | None = None


class FoldBatch(msgspec.Struct, array_like=True, frozen=True):
    messages: list[Stored]
    last_seq: int


class Refused(msgspec.Struct, array_like=True, frozen=True):
    """A message that is no event where it is stored, and why (to be quarantined)."""

    message: Stored
    reason: str


class Folded(msgspec.Struct, frozen=True):
    """The checkpoint after a batch and the messages it left out, or what stopped the fold."""

    seq: int = 0
    refused: list[Refused] = []
    error: str = ""


class FoldFailed(RuntimeError):
    """The fold process stopped on an error, or went away."""


class FoldProcess:
    """The parent's end: ``send`` batches in order; ``answers`` yields their checkpoints."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc
        self._encode = msgspec.msgpack.Encoder().encode
        self._answers = msgspec.msgpack.Decoder(Folded)

    @classmethod
    async def start(cls, path: Path) -> FoldProcess:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "projections.fold_process", str(path),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        assert proc.stdin is not None
        # the reader may run this far ahead of the fold: it waits only when the fold lags
        proc.stdin.transport.set_write_buffer_limits(high=WRITE_AHEAD)
        _widen(proc.stdin.transport.get_extra_info("pipe"))
        return cls(proc)

    async def send(self, messages: list[Stored], last_seq: int) -> None:
        stdin = self._proc.stdin
        assert stdin is not None
        frame = self._encode(FoldBatch(messages, last_seq))
        try:
            stdin.write(len(frame).to_bytes(HEADER, "big") + frame)
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as err:
            raise FoldFailed(await self._gone()) from err

    def finish(self) -> None:
        """No more batches: the child ends once it has applied those sent."""
        stdin = self._proc.stdin
        if stdin is not None and not stdin.is_closing():
            stdin.close()

    async def answers(self) -> AsyncIterator[Folded]:
        """What each batch came to, in order, until the child ends."""
        stdout = self._proc.stdout
        assert stdout is not None
        while True:
            try:
                header = await stdout.readexactly(HEADER)
                answer = self._answers.decode(await stdout.readexactly(self._size(header)))
            except asyncio.IncompleteReadError as err:
                if err.partial or await self._proc.wait() != 0:
                    raise FoldFailed(await self._gone()) from err
                return
            if answer.error:
                raise FoldFailed(answer.error)
            yield answer

    @staticmethod
    def _size(header: bytes) -> int:
        return int.from_bytes(header, "big")

    async def _gone(self) -> str:
        code = await self._proc.wait()
        return f"the fold process ended (exit code {code})"

    async def close(self) -> None:
        """Let the child finish the batch it is on and end; kill it if it does not."""
        self.finish()
        proc = self._proc
        try:
            async with asyncio.timeout(STOP_GRACE):
                await asyncio.shield(proc.wait())
        except (TimeoutError, asyncio.CancelledError):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
            raise


def _widen(pipe: Any) -> None:
    """Let the pipe hold a few batches (Linux; 64 KiB by default). The reader fills it
    only between two of its reads, while nats-py's callbacks hold its event loop: a pipe
    of one eighth of a batch ran dry meanwhile and left the fold waiting."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or over the user's limit
        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)


def serve(path: Path, frames: BinaryIO, answers: BinaryIO) -> None:
    """The child's loop: apply each batch read from ``frames`` until they end."""
    conn = sqlite3.connect(path, isolation_level=None)
    # a scratch file until it is moved into place (and synced then): no fsync meanwhile
    for pragma in ("synchronous = OFF", "foreign_keys = ON", "busy_timeout = 5000"):
        conn.execute(f"PRAGMA {pragma}")
    db = as_connection(InlineDatabase(conn))
    batches = msgspec.msgpack.Decoder(FoldBatch)
    encode = msgspec.msgpack.Encoder().encode
    try:
        while header := frames.read(HEADER):
            try:
                batch = batches.decode(frames.read(int.from_bytes(header, "big")))
                envelopes, refused = _decoded(batch.messages)
                update = run_inline(apply_batch(db, envelopes, batch.last_seq))
                seq = update.seq if update is not None else batch.last_seq
                answer = Folded(seq=seq, refused=refused)
            except Exception as err:  # told to the parent, which raises it
                traceback.print_exc()
                answer = Folded(error=f"{type(err).__name__}: {err}")
            frame = encode(answer)
            answers.write(len(frame).to_bytes(HEADER, "big") + frame)
            answers.flush()
            if answer.error:
                return
    finally:
        conn.close()


def _decoded(messages: list[Stored]) -> tuple[list[Envelope], list[Refused]]:
    envelopes: list[Envelope] = []
    refused: list[Refused] = []
    for m in messages:
        try:
            envelopes.append(stored_envelope(m.seq, m.subject, m.data, m.headers))
        except Undecodable as err:
            refused.append(Refused(m, err.reason))
    return envelopes, refused


if __name__ == "__main__":
    # what this process imported lives as long as it does, and the batches it folds are
    # freed by their reference counts: the collector, run whenever 700 objects were made
    # and not yet freed (a batch holds thousands) and at times over every module, took
    # about 5% of the fold's instructions
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    serve(Path(sys.argv[1]), sys.stdin.buffer, sys.stdout.buffer)
