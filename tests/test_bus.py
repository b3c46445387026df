from __future__ import annotations

import asyncio
import dataclasses

import msgspec
import pytest

from engine.bus import Appended, Bus, ConcurrencyConflict, Expect, applied_by
from engine.jobs.decider import CancelJob
from engine.jobs.service import JobCommands
from engine.quarantine import list_quarantined
from schemas import subjects
from schemas.events import Envelope, JobCancelled, JobCreated, encode_event
from schemas.ids import new_id, utcnow
from schemas.values import JobSettings, Platform, Target
from tests.conftest import NatsServer


def created(job_id: str) -> JobCreated:
    return JobCreated(
        id=new_id(),
        at=utcnow(),
        actor="test",
        job_id=job_id,
        name="n",
        targets=[Target(url="http://127.0.0.1/")],
        settings=JobSettings(),
    )


def cancelled(job_id: str, actor: str = "test") -> JobCancelled:
    return JobCancelled(id=new_id(), at=utcnow(), actor=actor, job_id=job_id)


async def create(bus: Bus, job_id: str) -> int:
    """A job's first event, stored as the job service stores it (expecting none before)."""
    scope = subjects.job_stream_filter(job_id)
    appended = await bus.append(created(job_id), msg_id=new_id(), expect=Expect(scope, 0))
    return appended.seq


async def test_screenshots_age_out_and_an_older_bucket_is_given_the_limit(
    bus: Bus, nats_server: NatsServer
) -> None:
    stream = f"OBJ_{subjects.SCREENSHOTS_BUCKET}"
    assert (await bus.js.stream_info(stream)).config.max_age == 7 * 24 * 3600
    for max_age in (3600.0, 7 * 24 * 3600.0):  # a changed setting reaches the bucket
        config = dataclasses.replace(bus.config, screenshots_max_age=max_age)
        async with await Bus.connect(nats_server.url, name="again", config=config) as again:
            await again.provision()
        assert (await bus.js.stream_info(stream)).config.max_age == max_age
    # the other buckets keep everything
    datasets = await bus.js.stream_info(f"OBJ_{subjects.DATASETS_BUCKET}")
    assert not datasets.config.max_age


async def test_provision_is_idempotent(bus: Bus) -> None:
    await bus.provision()
    await bus.provision()


async def test_same_msg_id_is_stored_once(bus: Bus) -> None:
    await create(bus, "job_a")
    event = cancelled("job_a")
    first = await bus.append(event, msg_id="m1")
    second = await bus.append(event, msg_id="m1")
    assert second.duplicate and second.seq == first.seq
    assert len(await bus.load(subjects.job_stream_filter("job_a"))) == 2


async def test_of_fifty_commands_at_one_version_one_is_stored_and_49_conflict(
    bus: Bus,
) -> None:
    head = await create(bus, "job_b")
    scope = subjects.job_stream_filter("job_b")

    async def writer(n: int) -> bool:
        # a different command each: its own command id, the same event type and version
        msg_id = subjects.command_msg_id(f"command-{n}")
        try:
            await bus.append(cancelled("job_b", f"w{n}"), msg_id=msg_id, expect=Expect(scope, head))
        except ConcurrencyConflict:
            return False
        return True

    wins = await asyncio.gather(*(writer(n) for n in range(50)))
    assert (sum(wins), wins.count(False)) == (1, 49)
    assert len(await bus.load(scope)) == 2


async def test_a_command_retried_after_a_lost_ack_is_stored_once(bus: Bus) -> None:
    jobs = JobCommands(bus)
    job_id = "job_c"
    head = await create(bus, job_id)
    scope = subjects.job_stream_filter(job_id)
    msg_id = subjects.command_msg_id("the-command")
    # the first try reaches the server; its ack never reaches the caller
    lost = await bus.append_nowait(cancelled(job_id), msg_id=msg_id, expect=Expect(scope, head))
    stored = (await lost).seq
    # resent as it was, the server refuses the stale expectation (nats-server checks the
    # expected sequence before the msg-id) ...
    with pytest.raises(ConcurrencyConflict):
        await bus.append(cancelled(job_id), msg_id=msg_id, expect=Expect(scope, head))
    # ... and the command service, re-reading, finds its own command in the log
    retry = await jobs.execute(CancelJob(job_id), "test", "the-command")
    assert retry.duplicate and retry.seq == stored
    assert [e.seq for e in await bus.load(scope)] == [head, stored]


async def test_a_retried_command_answers_what_the_log_holds_after_the_dedupe_window(
    bus: Bus,
) -> None:
    jobs = JobCommands(bus)
    target = [Target(url="http://127.0.0.1/")]
    job_id, first = await jobs.create(
        name="n", targets=target, settings=JobSettings(), platform=Platform(), actor="t",
        command_id="key-1",
    )  # fmt: skip
    cancel = await jobs.execute(CancelJob(job_id), "t", "key-2")
    # the server's dedupe is a window; the log remembers which command stored what
    again, seq = await jobs.create(
        name="other", targets=target, settings=JobSettings(), platform=Platform(), actor="t",
        command_id="key-1",
    )  # fmt: skip
    assert (again, seq.seq) == (job_id, first.seq)
    assert (await jobs.execute(CancelJob(job_id), "t", "key-2")).seq == cancel.seq
    assert len(await bus.load(subjects.job_stream_filter(job_id))) == 2


async def test_expect_zero_means_no_events_yet(bus: Bus) -> None:
    await create(bus, "job_d")
    with pytest.raises(ConcurrencyConflict):
        await create(bus, "job_d")


async def test_read_follows_new_events_in_order(bus: Bus) -> None:
    for n in range(5):
        await create(bus, f"job_{n}")
    seen: list[int] = []

    async def follow() -> None:
        async for batch in bus.read(1):
            seen.extend(e.seq for e in batch)
            if len(seen) >= 8:
                return

    task = asyncio.create_task(follow())
    for n in range(5, 8):
        await create(bus, f"job_{n}")
    await asyncio.wait_for(task, 10)
    assert seen == sorted(seen) and len(seen) == 8


GARBAGE = {
    "not JSON": ("tb.flow.job_q.FlowDone", b"{not json"),
    "wrong shape": ("tb.flow.job_q.FlowDone", b'{"type": "FlowDone", "job_id": 3}'),
    "unknown type": ("tb.job.job_q.JobExploded", b'{"type": "JobExploded"}'),
    "wrong subject": ("tb.job.job_other.JobCancelled", encode_event(cancelled("job_q"))),
    "forged creation": ("tb.job.job_q.JobCreated", encode_event(created("job_q"))),
    "naive time": (
        "tb.job.job_q.JobCancelled",
        msgspec.json.encode(
            {**msgspec.json.decode(encode_event(cancelled("job_q"))), "at": "2026-01-01T00:00:00"}
        ),
    ),
}


async def test_a_reader_that_reads_ahead_never_skips_nor_repeats(bus: Bus) -> None:
    # more than two batches of 5, and not a whole number of them
    stored = [(cancelled(f"job_{n}"), f"m{n}") for n in range(23)]
    last = (await bus.append_pipelined(stored))[-1].seq
    batches = [b async for b in bus.read_stored(1, batch=5, follow=False)]
    assert all(0 < len(b) <= 5 for b in batches)
    assert [seq for b in batches for seq, _ in b] == list(range(1, last + 1))
    # and from the middle, following, while more is stored
    seen: list[int] = []
    async for batch in bus.read_stored(last - 6, batch=5):
        seen.extend(seq for seq, _ in batch)
        if seen[-1] == last:
            await bus.append(cancelled("job_x"), msg_id="more")
        if seen[-1] == last + 1:
            break
    assert seen == list(range(last - 6, last + 2))


async def test_messages_that_are_not_events_are_quarantined_and_skipped(bus: Bus) -> None:
    head = await create(bus, "job_q")
    for subject, raw in GARBAGE.values():
        await bus.nc.publish(subject, raw)
    await bus.nc.flush()
    tail = (await bus.append(cancelled("job_q"), msg_id="tail")).seq
    batches = [b async for b in bus.read_batches(1, follow=False)]
    events = [e.seq for b in batches for e in b.envelopes]
    assert events == [head, tail]
    assert batches[-1].last_seq == tail
    assert len([q for b in batches for q in b.quarantined]) == len(GARBAGE)
    # a second reader (another process) finds them too; each is recorded once
    async for _ in bus.read_batches(1, follow=False):
        pass
    records, _ = await list_quarantined(bus.js)
    assert sorted(r.seq for r in records) == list(range(head + 1, tail))
    assert {r.subject for r in records} == {subject for subject, _ in GARBAGE.values()}
    assert all(r.reason and r.detected_by == "test" for r in records)
    assert {r.raw for r in records} == {raw for _, raw in GARBAGE.values()}


async def test_messages_that_are_not_events_are_skipped_across_batches_read_ahead(
    bus: Bus,
) -> None:
    # events and messages that are none, alternating, read two at a time: the batches
    # asked for ahead split them anywhere
    seqs: list[int] = []
    for n, (subject, raw) in enumerate(GARBAGE.values()):
        seqs.append((await bus.append(cancelled("job_q", f"a{n}"), msg_id=f"ev{n}")).seq)
        await bus.js.publish(subject, raw)
    last = (await bus.append(cancelled("job_q"), msg_id="tail")).seq
    batches = [b async for b in bus.read_batches(1, batch=2, follow=False)]
    assert [e.seq for b in batches for e in b.envelopes] == [*seqs, last]
    quarantined = [q.seq for b in batches for q in b.quarantined]
    assert quarantined == [seq + 1 for seq in seqs]
    assert batches[-1].last_seq == last


async def test_a_quarantined_tail_still_moves_the_position(bus: Bus) -> None:
    head = await create(bus, "job_t")
    # stored (acked) before the stream's last sequence is read
    await bus.js.publish("tb.flow.job_t.FlowDone", msgspec.json.encode({"type": "?"}))
    last = await bus.last_seq()
    batches = [b async for b in bus.read_batches(head + 1, follow=False)]
    assert [b.envelopes for b in batches] == [[]]
    assert batches[-1].last_seq == last == head + 1


def test_a_command_is_not_taken_for_another_whose_id_it_prefixes() -> None:
    event = JobCancelled(id=new_id(), at=utcnow(), actor="t", job_id="job_1")
    stored_by_a1 = Envelope(seq=7, subject="s", event=event, msg_id=subjects.command_msg_id("a:1"))
    assert applied_by([stored_by_a1], "a") is None
    assert applied_by([stored_by_a1], "a:1") == Appended(seq=7, duplicate=True)


async def test_a_filter_that_is_no_subject_is_refused_not_retried_for_ever(bus: Bus) -> None:
    for bad in ("tb.job..x", "tb.job.>.x"):
        with pytest.raises(ValueError, match="cannot read"):
            async with asyncio.timeout(5):
                async for _ in bus.read_batches(1, bad, follow=False):
                    pass


async def test_a_finite_read_waits_out_a_slow_server_instead_of_ending_early(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fetch that brings nothing within its wait is a slow server, not the end of the
    stream, while the consumer counted more at its start."""
    from engine.puller import Puller

    job_id = new_id()
    await create(bus, job_id)
    for n in range(4):
        await bus.append(cancelled(job_id, f"a{n}"), msg_id=new_id())
    fetch = Puller.fetch
    slow = {"left": 3}

    async def slow_server(self: Puller, batch: int, linger: float) -> list[object]:
        if slow["left"]:
            slow["left"] -= 1
            return []  # as when nothing arrived within the linger
        return await fetch(self, batch, 1)  # type: ignore[return-value]

    monkeypatch.setattr(Puller, "fetch", slow_server)
    loaded = await bus.load(subjects.job_stream_filter(job_id))
    assert len(loaded) == 5 and slow["left"] == 0
