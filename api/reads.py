"""Read-your-writes: a read waits until the read model has applied a sequence a write
answered, named by ``?min_seq=`` where a read takes it, or by the ``TB-Min-Seq`` header
on any request (so a client can send it on every call to any replica)."""

from __future__ import annotations

import re
from typing import Any

from litestar import Request
from litestar.params import HeaderParameter

from api.services import Services
from engine.errors import Conflict, Invalid

MIN_SEQ_HELP = "wait until the read model has applied this stream sequence (read-your-writes)"
MIN_SEQ_HEADER = "TB-Min-Seq"
MIN_SEQ_RULE = "must be a whole number from 0 to 2**63 - 1"
_DIGITS = re.compile(r"[0-9]{1,19}")

# declared on every route, so every operation documents the header
MIN_SEQ_PARAMETERS = {
    "tb_min_seq": HeaderParameter(
        annotation=int | None,
        name=MIN_SEQ_HEADER,
        required=False,
        default=None,
        ge=0,
        le=2**63 - 1,
        description=f"{MIN_SEQ_HELP}; the same as ?min_seq= where a read takes it",
    )
}


async def wait_for_seq(services: Services, min_seq: int, field: str = "min_seq") -> None:
    if min_seq <= 0:
        return
    last = await services.bus.last_seq()
    if min_seq > last:  # no write answered this sequence: waiting would not bring it
        raise Conflict(field, f"the log holds no sequence {min_seq} (its last is {last})")
    try:
        await services.projector.wait_for(min_seq, timeout=services.config.read_wait_timeout)
    except TimeoutError:
        raise Conflict(
            field,
            f"read model has not reached {min_seq} yet (at {services.projector.position})",
        ) from None


async def wait_for_header_seq(request: Request[Any, Any, Any]) -> None:
    """``before_request``: honour ``TB-Min-Seq`` before the handler reads anything."""
    raw = request.headers.get(MIN_SEQ_HEADER)
    if raw is None:
        return
    if not _DIGITS.fullmatch(raw.strip()) or int(raw) > 2**63 - 1:
        raise Invalid(MIN_SEQ_HEADER, MIN_SEQ_RULE)
    services: Services = request.app.state.services
    await wait_for_seq(services, int(raw), MIN_SEQ_HEADER)
