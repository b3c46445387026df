"""Reading a stored message back as an event, checked for shape, meaning and place.

A message that fails any check is not an event of this system, whatever it claims:
readers quarantine it (``engine.quarantine``) and skip it.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from schemas import subjects
from schemas.events import Envelope, JobCreated, TbEvent, decode_event


class Undecodable(Exception):
    """A stored message that is not an event where it is stored; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode_stored(subject: str, data: bytes, headers: Mapping[str, str] | None) -> TbEvent:
    """The event a message of the events stream holds, or ``Undecodable``.

    Beyond decoding (shape, types, bounds, time zones, URLs, ids), the event must belong
    on the subject it was stored on — which also catches ids that do not fit their subject
    — and a ``JobCreated`` must have been stored as its job's first event: the server
    checked ``Nats-Expected-Last-Subject-Sequence: 0`` on the job's subjects, so a
    re-stored or forged creation can never restart a job that exists.
    """
    try:
        event = decode_event(data)
    except msgspec.ValidationError as err:
        raise Undecodable(f"not an event: {err}") from None
    except msgspec.DecodeError as err:
        raise Undecodable(f"not JSON: {err}") from None
    expected = subjects.subject_for(event)
    if expected != subject:
        raise Undecodable(f"a {type(event).__name__} belongs on {expected}, not on {subject}")
    if type(event) is JobCreated and not _first_of_its_job(event, headers):
        raise Undecodable("JobCreated not stored as the job's first event")
    return event


def stored_envelope(
    seq: int, subject: str, data: bytes, headers: Mapping[str, str] | None
) -> Envelope:
    """The envelope of a stored message (``decode_stored``), with its msg-id."""
    event = decode_stored(subject, data, headers)
    msg_id = headers.get(subjects.MSG_ID_HEADER, "") if headers else ""
    return Envelope(seq, subject, event, msg_id)


def _first_of_its_job(event: JobCreated, headers: Mapping[str, str] | None) -> bool:
    if not headers:
        return False
    return headers.get(subjects.EXPECTED_LAST_SUBJECT_SEQ) == "0" and headers.get(
        subjects.EXPECTED_LAST_SUBJECT_SEQ_SUBJECT
    ) == subjects.job_stream_filter(event.job_id)
