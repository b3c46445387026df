"""A display for a headed browser: the one the session has, else an Xvfb of our own."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator

import structlog

log = structlog.get_logger("tb.runner")

XVFB_SCREEN = "1920x1080x24"
XVFB_READY_TIMEOUT = 10.0  # seconds Xvfb gets to open its display
NO_XVFB = (
    "a headed browser needs a display: DISPLAY is not set and Xvfb is not installed "
    "(apt-get install xvfb, or ./dev up --headed which installs it)"
)


@contextlib.asynccontextmanager
async def display_for_headed_browser() -> AsyncIterator[str]:
    """The X display a headed browser opens its windows on, for as long as it is needed.

    With ``DISPLAY`` set, that one. Without, an Xvfb started here (it picks a free
    display number and says it when ready), exported as ``DISPLAY`` for the browser the
    runner launches, and stopped on the way out.
    """
    current = os.environ.get("DISPLAY")
    if current:
        yield current
        return
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        raise SystemExit(NO_XVFB)
    read_fd, write_fd = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            xvfb,
            "-displayfd",
            str(write_fd),
            "-screen",
            "0",
            XVFB_SCREEN,
            "-nolisten",
            "tcp",
            pass_fds=(write_fd,),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            # out of the terminal's process group: a Ctrl-C drains the runner, and the
            # browser needs its display until the drain is over (we stop it after)
            start_new_session=True,
        )
    finally:
        os.close(write_fd)
    try:
        with os.fdopen(read_fd, "rb") as ready:
            number = await asyncio.wait_for(asyncio.to_thread(ready.readline), XVFB_READY_TIMEOUT)
        if not number.strip():
            raise SystemExit(f"Xvfb exited before it opened a display (code {proc.returncode})")
        display = f":{number.decode().strip()}"
        os.environ["DISPLAY"] = display
        log.info("Started Xvfb for the headed browser", display=display, pid=proc.pid)
        yield display
    finally:
        os.environ.pop("DISPLAY", None)
        if proc.returncode is None:
            proc.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 5)
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
