"""The audit trail over HTTP: filters, cursor pages, and exports that parse back."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar.testing import AsyncTestClient

from api.audit import _csv, _export, _jsonl
from engine.bus import Bus
from projections import audit_reads
from projections.audit_reads import AuditFilter, AuditLine
from projections.db import connect
from projections.projector import Projector
from tests.api_client import client
from tests.audit_history import history, job_events, store

__all__ = ["client"]  # fixtures


async def get_all(client: AsyncTestClient, query: str, limit: int = 1000) -> list[dict[str, Any]]:
    r = await client.get(f"/api/v1/audit?limit={limit}&{query}")
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["items"]
    return items


async def test_filters_by_job_actor_type_and_time(client: AsyncTestClient, bus: Bus) -> None:
    last = await history(bus)
    everything = await get_all(client, f"min_seq={last}")
    assert [e["seq"] for e in everything] == list(range(1, last + 1))
    # what the API sets up at its start (the first admin and their login, the device
    # catalogue it adopts) comes first, in either order: then the history
    setup = ("tb.user.", "tb.catalogue.")
    first = next(e for e in everything if not e["subject"].startswith(setup))
    assert first["subject"] == "tb.job.job_a.JobCreated" and first["type"] == "JobCreated"
    assert (first["actor"], first["job_id"]) == ("alice", "job_a")
    assert first["at"] == "2026-03-01T12:00:00Z" and first["event"]["name"] == "job_a"
    runner = next(e for e in everything if e["type"] == "RunnerRegistered")
    assert runner["job_id"] is None and runner["subject"] == "tb.runner.runner-1.RunnerRegistered"
    dispatched = next(e for e in everything if e["type"] == "FlowDispatched")
    assert dispatched["job_id"] == "job_a" and dispatched["subject"] == "tb.dispatch.linux.chromium"

    job_b = await get_all(client, "job_id=job_b")
    assert len(job_b) == 8 and {e["job_id"] for e in job_b} == {"job_b"}
    assert [e["type"] for e in await get_all(client, "actor=alice")] == ["JobCreated"]
    done = await get_all(client, "type=FlowDone")
    assert [e["event"]["flow_id"] for e in done] == [f"job_a-f{n}" for n in range(2)] + [
        f"job_b-f{n}" for n in range(3)
    ]
    assert len(await get_all(client, "type=FlowDone&job_id=job_b&actor=runner-1")) == 3
    window = await get_all(client, "from=2026-03-01T12:00:02Z&to=2026-03-01T12:03:20Z")
    assert [e["at"] for e in window] == [
        "2026-03-01T12:00:02Z",
        "2026-03-01T12:00:03Z",
        "2026-03-01T12:00:03Z",
        "2026-03-01T12:00:04Z",
        "2026-03-01T12:01:40Z",
    ]  # from is inclusive, to exclusive (job_b starts at 12:03:20)
    # another offset, and a time without one (taken as UTC), name the same instants
    assert await get_all(client, "from=2026-03-01T13:01:40%2B01:00") == await get_all(
        client, "from=2026-03-01T12:01:40"
    )
    assert await get_all(client, "job_id=job_nobody") == []


async def test_cursor_pages_walk_the_trail_once_and_then_its_tail(
    client: AsyncTestClient, bus: Bus
) -> None:
    last = await history(bus)
    seen: list[int] = []
    cursor = ""
    pages = 0
    while True:
        r = await client.get(f"/api/v1/audit?limit=3&min_seq={last}{cursor}")
        assert r.status_code == 200, r.text
        body = r.json()
        seen += [e["seq"] for e in body["items"]]
        cursor = f"&cursor={body['next_cursor']}"
        pages += 1
        if not body["has_more"]:
            break
    assert seen == list(range(1, last + 1)) and pages == -(-last // 3)
    # the last cursor answers what is stored later, and nothing before it
    empty = (await client.get(f"/api/v1/audit?limit=3{cursor}")).json()
    assert empty["items"] == [] and not empty["has_more"]
    later = await store(bus, job_events("job_c", "carol", 400, flows=1))
    tail = (await client.get(f"/api/v1/audit?limit=100&min_seq={later}{cursor}")).json()
    assert [e["seq"] for e in tail["items"]] == list(range(last + 1, later + 1))
    # filters and cursor together: a page of one job's events at a time
    r = await client.get("/api/v1/audit?job_id=job_b&limit=5")
    page1 = r.json()
    r = await client.get(f"/api/v1/audit?job_id=job_b&limit=5&cursor={page1['next_cursor']}")
    page2 = r.json()
    assert page1["has_more"] and not page2["has_more"]
    assert len(page1["items"]) + len(page2["items"]) == 8


BAD_FILTERS = [
    ("job_id=not%20an%20id", "job_id"),
    ("job_id=a.b", "job_id"),
    ("type=NoSuchEvent", "type"),
    ("from=yesterday", "from"),
    ("to=2026-13-01T00:00:00Z", "to"),
    ("from=2026-03-02T00:00:00Z&to=2026-03-01T00:00:00Z", "to"),
    ("actor=" + "x" * 201, "actor"),
    ("min_seq=-1", "min_seq"),
]
BAD_PAGING = [
    ("cursor=garbage!", "cursor"),
    ("cursor=eyJhZnRlciI6LTF9", "cursor"),  # {"after":-1}
    ("cursor=eyJiZWZvcmUiOjF9", "cursor"),  # {"before":1}
    ("cursor=eyJhZnRlciI6OTIyMzM3MjAzNjg1NDc3NTgwOH0", "cursor"),  # {"after":2**63}
    ("cursor=WzFd", "cursor"),  # [1]
    ("limit=0", "limit"),
    ("limit=1001", "limit"),
]


async def test_bad_filters_are_400_naming_the_field(client: AsyncTestClient) -> None:
    cases = [(f"/api/v1/audit?{q}", field) for q, field in BAD_FILTERS + BAD_PAGING]
    cases += [(f"/api/v1/audit/export?{q}", field) for q, field in BAD_FILTERS]
    cases += [("/api/v1/audit/export?format=xml", "format")]
    for url, field in cases:
        r = await client.get(url)
        assert r.status_code == 400, (url, r.text)
        assert r.json()["field"] == field, (url, r.text)


def parse_jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def parse_csv(text: str) -> list[dict[str, Any]]:
    rows = list(csv.DictReader(io.StringIO(text)))
    return [
        {**row, "seq": int(row["seq"]), "job_id": row["job_id"] or None,
         "event": json.loads(row["event"])}
        for row in rows
    ]  # fmt: skip


def comparable(entry: dict[str, Any]) -> dict[str, Any]:
    """An entry of the paged API with its time as an instant, to compare with an export."""
    return {**entry, "at": datetime.fromisoformat(entry["at"].replace("Z", "+00:00"))}


async def test_exports_stream_every_matching_event_in_batches_and_parse_back(
    client: AsyncTestClient, bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_reads, "EXPORT_BATCH", 4)  # many batches from a short trail
    last = await history(bus)
    await client.get(f"/api/v1/audit?min_seq={last}")
    for query in ("", "job_id=job_b", "type=FlowDone&actor=runner-1", "from=2026-03-01T12:01:00Z"):
        expected = [comparable(e) for e in await get_all(client, query)]
        for fmt, parse, media in (
            ("jsonl", parse_jsonl, "application/x-ndjson"),
            ("csv", parse_csv, "text/csv"),
        ):
            r = await client.get(f"/api/v1/audit/export?format={fmt}&{query}")
            assert r.status_code == 200, r.text
            assert r.headers["content-type"].startswith(media)
            assert "content-length" not in r.headers  # streamed, not built whole
            assert f'.{fmt}"' in r.headers["content-disposition"]
            lines = r.text.splitlines()
            assert len(lines) == len(expected) + (fmt == "csv")  # one line per event
            got = [comparable(entry) for entry in parse(r.text)]
            assert got == expected, (fmt, query)
    assert (await client.get("/api/v1/audit/export")).text == (
        await client.get("/api/v1/audit/export?format=jsonl")
    ).text
    r = await client.get("/api/v1/audit/export?format=csv&job_id=job_nobody")
    assert r.text.splitlines() == ["seq,subject,at,actor,type,job_id,event"]


async def test_a_quarantined_message_has_no_entry_and_holds_nothing_back(
    client: AsyncTestClient, bus: Bus
) -> None:
    first = await store(bus, job_events("job_a", "alice", 0, flows=1))
    await bus.js.publish("tb.flow.job_a.FlowDone", b"{not json")
    last = await store(bus, job_events("job_b", "bob", 10, flows=1))
    seqs = [e["seq"] for e in await get_all(client, f"min_seq={last}")]
    assert seqs == [*range(1, first + 1), *range(first + 2, last + 1)]
    r = await client.get("/api/v1/audit/export")
    assert [json.loads(line)["seq"] for line in r.text.splitlines()] == seqs


async def test_an_export_reads_one_snapshot_and_closes_its_connection_when_left(
    bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_reads, "EXPORT_BATCH", 2)
    async with Projector(bus, tmp_path / "read.db") as projector:
        last = await history(bus)
        await projector.wait_for(last, timeout=10)
        db = await connect(tmp_path / "read.db", readonly=True)
        body = _export(db, AuditFilter(), _jsonl)
        first = await anext(body)
        assert len(first.splitlines()) == 2
        later = await store(bus, job_events("job_c", "carol", 400, flows=1))
        await projector.wait_for(later, timeout=10)  # applied while the export runs
        rest = b"".join([chunk async for chunk in body])
        seqs = [json.loads(line)["seq"] for line in (first + rest).splitlines()]
        assert seqs == list(range(1, last + 1))  # as of when it began: it ends

        db = await connect(tmp_path / "read.db", readonly=True)
        body = _export(db, AuditFilter(), _csv)
        await anext(body)
        await body.aclose()  # the client left halfway
        with pytest.raises(ValueError, match="no active connection"):
            await db.execute("SELECT 1")


async def test_a_csv_cell_a_spreadsheet_would_run_is_exported_as_text() -> None:
    async def one(actor: str) -> AsyncIterator[list[AuditLine]]:
        yield [AuditLine(seq=1, subject="tb.job.j.JobCancelled", at="t", actor=actor,
                         type="JobCancelled", job_id="j", event=msgspec.Raw(b"{}"))]  # fmt: skip

    for actor in ('=HYPERLINK("http://x")', "+1", "-1", "@SUM(A1)", "\tx"):
        text = b"".join([chunk async for chunk in _csv(one(actor))]).decode()
        (row,) = parse_csv(text)
        assert row["actor"] == f"'{actor}"
    text = b"".join([chunk async for chunk in _csv(one("runner_1"))]).decode()
    assert parse_csv(text)[0]["actor"] == "runner_1"
