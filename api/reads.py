"""Read-your-writes: a read waits until the read model has applied a sequence a write
answered (``?min_seq=``)."""

from __future__ import annotations

from api.services import Services
from engine.errors import Conflict

MIN_SEQ_HELP = "wait until the read model has applied this stream sequence (read-your-writes)"


async def wait_for_seq(services: Services, min_seq: int) -> None:
    if min_seq <= 0:
        return
    last = await services.bus.last_seq()
    if min_seq > last:  # no write answered this sequence: waiting would not bring it
        raise Conflict("min_seq", f"the log holds no sequence {min_seq} (its last is {last})")
    try:
        await services.projector.wait_for(min_seq, timeout=services.config.read_wait_timeout)
    except TimeoutError:
        raise Conflict(
            "min_seq",
            f"read model has not reached {min_seq} yet (at {services.projector.position})",
        ) from None
