"""A cancel that a library lost is raised again at the loop's next turn.

On Python 3.11, ``asyncio.wait_for`` returns the inner result when that result and a
cancel of the awaiting task land in the same turn of the event loop (CPython gh-86296,
fixed in 3.12), and nats-py awaits every request that way. The task's ``cancelling()``
count still says a cancel was asked for, so a long-running loop that checks it on each
turn stops as asked instead of running on until the next cancel, which may never come.
"""

from __future__ import annotations

import asyncio


def raise_if_cancelled() -> None:
    """Raise ``CancelledError`` if the current task was asked to stop and is still running."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
