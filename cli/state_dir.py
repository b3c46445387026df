"""The layout of a state directory (``--state-dir``, default ``.tb``) and who owns it.

```
<state-dir>/jetstream/    the nats-server store: the event log
<state-dir>/read.db       the API's read model
<state-dir>/logs/<name>.log, <state-dir>/pids/<name>.pid   one per child of `tb up`
<state-dir>/nats.url      where the running `tb up` serves NATS
<state-dir>/tb.lock       held by the process that serves the store (`tb up`, or an
                          offline `tb replay` / `tb quarantine`)
```
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from schemas import subjects


class StateDirBusy(Exception):
    """Another process serves this state directory's event store."""

    def __init__(self, root: Path, holder: str) -> None:
        who = f"pid {holder}" if holder else "another process"
        super().__init__(f"--state-dir {root} is in use by {who}")
        self.root, self.holder = root, holder


@dataclass(frozen=True)
class StateDir:
    root: Path

    @property
    def store(self) -> Path:
        """The directory given to ``nats-server -sd``."""
        return self.root / "jetstream"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def pids(self) -> Path:
        return self.root / "pids"

    @property
    def read_db(self) -> Path:
        return self.root / "read.db"

    @property
    def nats_url_file(self) -> Path:
        return self.root / "nats.url"

    def has_event_store(self) -> bool:
        """The store holds the events stream (written by an earlier `tb up`)."""
        streams = self.store / "jetstream"
        return any(streams.glob(f"*/streams/{subjects.EVENTS_STREAM}"))

    def recorded_nats_url(self) -> str | None:
        """The NATS URL a running (or killed) `tb up` recorded for this state dir."""
        try:
            return self.nats_url_file.read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            return None

    def write_pid(self, name: str, pid: int) -> None:
        self.pids.mkdir(parents=True, exist_ok=True)
        path = self.pids / f"{name}.pid"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{pid}\n", encoding="ascii")
        os.replace(tmp, path)  # a reader never sees a half-written pid

    def remove_pid(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.pids / f"{name}.pid").unlink()

    @contextlib.contextmanager
    def owned(self) -> Iterator[None]:
        """Hold the state dir's lock (released by the kernel if this process dies).

        Raises ``StateDirBusy`` naming the holder when another process holds it.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "tb.lock", "a+", encoding="ascii") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                raise StateDirBusy(self.root, lock.read().strip()) from None
            lock.seek(0)
            lock.truncate()
            lock.write(f"{os.getpid()}\n")
            lock.flush()
            try:
                yield
            finally:
                lock.seek(0)
                lock.truncate()
