"""Datasets over HTTP with a real nats-server: upload, list, versions, download, rename,
delete, and files refused whole with the rows named."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import msgspec
from litestar.testing import AsyncTestClient

from engine.bus import Bus
from engine.datasets.parse import Parsed, parse_file
from engine.datasets.versions import load_version
from schemas import subjects
from schemas.datasets import PASSWORD_MASK, ProxyRow, TargetRow
from schemas.events import DatasetFormat, DatasetKind, DatasetShared
from tests.api_client import client
from tests.conftest import NatsServer
from tests.datasets import send_chunks, start, upload
from tests.test_api_licences import assign, stored

__all__ = ["client"]  # fixtures


def parse_bytes(data: bytes, kind: DatasetKind, fmt: DatasetFormat) -> Parsed:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"f.{fmt}"
        path.write_bytes(data)
        return parse_file(path, kind, fmt, io.BytesIO())


async def raw_events(bus: Bus) -> bytes:
    """Every stored event's bytes, as the stream holds them."""
    raw = b""
    last = await bus.last_seq()
    for seq in range(1, last + 1):
        msg = await bus.js.get_msg(subjects.EVENTS_STREAM, seq)
        raw += msg.data or b""
    return raw


TARGETS = (
    b"ID,URL,Type,Source,Keyword,flowTarget,click-target,Referrer\n"
    b"t1,http://a.example/,landing,newsletter,shoes,3,1,http://ref.example/\n"
    b"t2,http://b.example/x,,,,,,\n"
    b"t1,http://a.example/,landing,newsletter,shoes,3,1,http://ref.example/\n"
)


async def test_targets_csv_uploads_as_version_1_with_duplicates_warned(
    client: AsyncTestClient, nats_server: NatsServer
) -> None:
    status, body = await upload(client, TARGETS, name="shop")
    assert status == 201, body
    assert body["version"] == 1 and body["rows"] == 2
    assert [(w["row"], w["rule"]) for w in body["warnings"]] == [
        (4, "duplicate of an earlier row: kept once")
    ]
    dataset_id = body["dataset_id"]
    r = await client.get(f"/api/v1/datasets/{dataset_id}/versions", params={"min_seq": body["seq"]})
    assert r.status_code == 200, r.text
    [version] = r.json()
    assert version["rows"] == 2 and len(version["sha256"]) == 64
    r = await client.get(f"/api/v1/datasets/{dataset_id}/versions/1")
    assert r.status_code == 200, r.text
    rows = [msgspec.json.decode(line, type=TargetRow) for line in r.content.splitlines()]
    assert rows[0] == TargetRow(
        url="http://a.example/",
        id="t1",
        type="landing",
        source="newsletter",
        keyword="shoes",
        flow_target=3,
        click_target=1,
        referrer="http://ref.example/",
    )
    async with await Bus.connect(nats_server.url, name="test") as bus:
        loaded = await load_version(bus, dataset_id, 1)
    assert loaded.kind == "targets" and loaded.rows == rows


async def test_csv_with_three_bad_rows_is_refused_naming_them_and_nothing_is_stored(
    client: AsyncTestClient, nats_server: NatsServer
) -> None:
    bad = (
        b"url,flowTarget,clickTarget\n"
        b"http://ok.example/,1,0\n"
        b"ftp://wrong.example/,1,0\n"  # row 3: scheme
        b"http://ok.example/b,0,0\n"  # row 4: flows
        b"http://ok.example/c,1,\n"
        b"http://ok.example/d,1,99\n"  # row 6: clicks
    )
    status, body = await upload(client, bad)
    assert status == 422, body
    assert [(e["row"], e["field"]) for e in body["errors"]] == [
        (3, "url"),
        (4, "flow_target"),
        (6, "click_target"),
    ]
    assert "http:// or https://" in body["errors"][0]["rule"]
    assert await stored(nats_server, "tb.dataset.>") == []
    listed = await client.get("/api/v1/datasets")
    assert listed.status_code == 200 and listed.json() == []


async def test_a_file_with_more_bad_rows_names_the_first_fifty() -> None:
    bad = b"url\n" + b"".join(b"nope%d\n" % n for n in range(200))
    status_rows = parse_bytes(bad, "targets", "csv")
    assert len(status_rows.errors) == 50
    assert [e.row for e in status_rows.errors[:3]] == [2, 3, 4]


async def test_proxy_passwords_stay_out_of_the_log_and_downloads_mask_them(
    client: AsyncTestClient, nats_server: NatsServer
) -> None:
    txt = b"http://alice:S3cret-pw@10.0.0.1:3128\n# a comment\nsocks5://10.0.0.2:1080\n"
    status, body = await upload(client, txt, kind="proxies", fmt="txt", name="pool")
    assert status == 201, body
    assert body["rows"] == 2
    async with await Bus.connect(nats_server.url, name="test") as bus:
        raw = await raw_events(bus)
    assert b"S3cret-pw" not in raw and b"DatasetVersionUploaded" in raw
    url = f"/api/v1/datasets/{body['dataset_id']}/versions/1"
    masked = await client.get(url)
    assert masked.status_code == 200
    assert b"S3cret-pw" not in masked.content and PASSWORD_MASK.encode() in masked.content
    shown = await client.get(url, params={"passwords": "show"})
    first = msgspec.json.decode(shown.content.splitlines()[0], type=ProxyRow)
    assert (first.username, first.password, first.port) == ("alice", "S3cret-pw", 3128)


async def test_a_plan_without_proxy_import_cannot_finish_a_proxies_upload(
    client: AsyncTestClient, nats_server: NatsServer
) -> None:
    data = b"scheme,host,port\nhttp,10.0.0.1,3128\n"
    started = await start(client, data, kind="proxies")
    await send_chunks(client, started, data)
    await assign(client, nats_server, "standard")
    r = await client.post(f"/api/v1/datasets/uploads/{started['upload_id']}/finish")
    assert r.status_code == 403, r.text
    assert r.json()["field"] == "kind" and "proxy_import" in r.json()["rule"]
    assert await stored(nats_server, "tb.dataset.>") == []
    refused = await client.post(
        "/api/v1/datasets/uploads",
        json={"name": "p", "kind": "proxies", "format": "csv", "size": 1, "sha256": "0" * 64},
    )
    assert refused.status_code == 403 and "proxy_import" in refused.json()["rule"]


async def test_xlsx_and_docx_files_are_parsed(client: AsyncTestClient, tmp_path: Path) -> None:
    import docx
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["Flow Target", "URL", "keyword"])
    sheet.append([2, "http://x.example/", "a"])
    sheet.append([1, "http://y.example/", None])
    book.save(tmp_path / "t.xlsx")
    status, body = await upload(client, (tmp_path / "t.xlsx").read_bytes(), fmt="xlsx")
    assert status == 201, body
    assert body["rows"] == 2

    document = docx.Document()
    document.add_paragraph("Our proxies")
    table = document.add_table(rows=3, cols=3)
    for r, cells in enumerate([("Scheme", "Host", "Port"), ("http", "10.0.0.1", "3128"),
                               ("socks5", "proxy.example", "1080")]):  # fmt: skip
        for c, text in enumerate(cells):
            table.cell(r, c).text = text
    document.save(tmp_path / "p.docx")
    status, body = await upload(
        client, (tmp_path / "p.docx").read_bytes(), kind="proxies", fmt="docx"
    )
    assert status == 201, body
    assert body["rows"] == 2

    paragraphs = docx.Document()
    for url in ("http://a.example/", "", "http://b.example/"):
        paragraphs.add_paragraph(url)
    paragraphs.save(tmp_path / "u.docx")
    with (tmp_path / "u.docx").open("rb") as f:
        r = await client.post(
            "/api/v1/datasets/import",
            files={"file": ("u.docx", f.read())},
            data={"kind": "targets"},
        )
    assert r.status_code == 201, r.text
    assert r.json()["rows"] == 2


async def test_devices_and_settings_profiles_from_json(client: AsyncTestClient) -> None:
    devices = b'[{"name": "iPhone 13", "locale": "de-DE"}, {"name": "default"}]'
    status, body = await upload(client, devices, kind="devices", fmt="json")
    assert status == 201 and body["rows"] == 2, body
    bad = b'[{"name": "No Such Phone"}]'
    status, body = await upload(client, bad, kind="devices", fmt="json")
    assert status == 422 and body["errors"][0]["field"] == "name", body
    settings = b'{"name": "slow", "settings": {"instance_count": 3, "page_traffic": 2}}'
    status, body = await upload(client, settings, kind="settings", fmt="json")
    assert status == 201 and body["rows"] == 1, body
    bad = b'{"name": "x", "settings": {"instance_count": 0}}'
    status, body = await upload(client, bad, kind="settings", fmt="json")
    assert status == 422 and body["errors"][0]["field"] == "settings.instance_count", body


async def test_owner_renames_shares_and_deletes(
    client: AsyncTestClient, nats_server: NatsServer
) -> None:
    status, body = await upload(client, TARGETS, name="first")
    dataset_id = body["dataset_id"]
    r = await client.patch(f"/api/v1/datasets/{dataset_id}", json={"name": "second"})
    assert r.status_code == 200, r.text
    nobody = await client.put(f"/api/v1/datasets/{dataset_id}/shares/bob")
    assert (nobody.status_code, nobody.json()["field"]) == (404, "user_id"), nobody.text
    assert nobody.json()["rule"] == "no user bob"
    made = await client.post(
        "/api/v1/users", json={"username": "bob", "password": "bob-password-long"}
    )
    assert made.status_code == 201, made.text
    bob = made.json()["user_id"]
    r = await client.put(f"/api/v1/datasets/{dataset_id}/shares/{bob}")
    assert r.status_code == 200, r.text
    got = await client.get(f"/api/v1/datasets/{dataset_id}", params={"min_seq": r.json()["seq"]})
    assert got.json()["name"] == "second" and got.json()["shared_with"] == [bob]
    shared = [e for e in await stored(nats_server, "tb.dataset.>") if isinstance(e, DatasetShared)]
    assert [e.user_id for e in shared] == [bob]  # the refused share left nothing
    assert got.json()["owner"] == (await client.get("/api/v1/auth/me")).json()["user_id"]
    # a second version of the same dataset
    status, again = await upload(client, b"url\nhttp://c.example/\n", dataset_id=dataset_id)
    assert status == 201 and again["version"] == 2 and again["dataset_id"] == dataset_id
    wrong_kind = await client.post(
        "/api/v1/datasets/uploads",
        json={"name": "p", "kind": "proxies", "format": "csv", "size": 1, "sha256": "0" * 64,
              "dataset_id": dataset_id},
    )  # fmt: skip
    assert wrong_kind.status_code == 409 and wrong_kind.json()["field"] == "kind"
    r = await client.delete(f"/api/v1/datasets/{dataset_id}")
    assert r.status_code == 200, r.text
    gone = await client.get(f"/api/v1/datasets/{dataset_id}", params={"min_seq": r.json()["seq"]})
    assert gone.status_code == 404
    assert (await client.get("/api/v1/datasets")).json() == []


async def test_a_retried_finish_answers_the_same_dataset(client: AsyncTestClient) -> None:
    started = await start(client, TARGETS)
    await send_chunks(client, started, TARGETS)
    url = f"/api/v1/datasets/uploads/{started['upload_id']}/finish"
    first, second = await client.post(url), await client.post(url)
    assert first.status_code == second.status_code == 201
    assert first.json() == second.json()
    view = await client.get(f"/api/v1/datasets/uploads/{started['upload_id']}")
    assert view.json()["finished"]["dataset_id"] == first.json()["dataset_id"]


async def test_bad_upload_starts_and_chunks_name_the_field(client: AsyncTestClient) -> None:
    r = await client.post(
        "/api/v1/datasets/uploads",
        json={"name": "x", "kind": "nope", "format": "csv", "size": 1, "sha256": "0" * 64},
    )
    assert r.status_code == 400 and r.json()["field"] == "kind"
    too_big = {"name": "x", "kind": "targets", "format": "csv", "size": 1 << 40, "sha256": "0" * 64}
    r = await client.post("/api/v1/datasets/uploads", json=too_big)
    assert r.status_code == 422 and r.json()["field"] == "size"
    csv_devices = {**too_big, "size": 5, "kind": "devices"}
    r = await client.post("/api/v1/datasets/uploads", json=csv_devices)
    assert r.status_code == 422 and r.json()["rule"] == "devices come as json, not csv"
    started = await start(client, TARGETS)
    base = f"/api/v1/datasets/uploads/{started['upload_id']}"
    r = await client.put(f"{base}/chunks/5", content=b"x")
    assert r.status_code == 400 and r.json()["field"] == "index"
    r = await client.put(f"{base}/chunks/0", content=b"short")
    assert r.status_code == 400 and r.json()["field"] == "body"
    r = await client.post(f"{base}/finish")
    assert r.status_code == 409 and r.json()["field"] == "chunks"
    r = await client.put(f"{base}/chunks/0", content=TARGETS[::-1])  # right size, wrong bytes
    r = await client.post(f"{base}/finish")
    assert r.status_code == 422 and r.json()["field"] == "sha256"
    await client.put(f"{base}/chunks/0", content=TARGETS)  # the failed finish let go
    r = await client.post(f"{base}/finish")
    assert r.status_code == 201, r.text
    r = await client.get("/api/v1/datasets/uploads/up_nope")
    assert r.status_code == 404


def test_columns_not_read_are_warned_and_a_huge_line_refuses_the_file() -> None:
    parsed = parse_bytes(b"URL;Colour\nhttp://a.example/;red\n", "targets", "csv")
    assert parsed.rows == 1 and parsed.errors == []
    assert [(w.row, w.field) for w in parsed.warnings] == [(1, "Colour")]
    huge = b"url\nhttp://a.example/" + b"x" * (2 * 1024 * 1024) + b"\n"
    refused = parse_bytes(huge, "targets", "csv")
    assert [e.field for e in refused.errors] == ["file"]
    assert "longer than" in refused.errors[0].rule
    assert parse_bytes(b"\xff\xfe\x00bad", "targets", "txt").errors[0].field == "file"
    assert parse_bytes(b"PK not a zip", "targets", "xlsx").errors[0].field == "file"
    assert parse_bytes(b"[1, 2", "devices", "json").errors[0].field == "file"
    assert parse_bytes(b"url\n", "targets", "csv").errors[0].rule == "must hold at least one row"
    assert parse_bytes(b"name\nx\n", "targets", "csv").errors[0].field == "header"
    assert parse_bytes(b"id\n7\n", "targets", "csv").errors[0].field == "url"


def test_rows_are_numbered_as_the_file_has_them() -> None:
    parsed = parse_bytes(b"\n\nurl\nhttp://a.example/\nnope\n", "targets", "csv")
    assert [(e.row, e.place) for e in parsed.errors] == [(5, "row 5")]
    parsed = parse_bytes(b"# list\nhttp://a.example/\n\nnope\n", "targets", "txt")
    assert [(e.row, e.place) for e in parsed.errors] == [(4, "line 4")]
    parsed = parse_bytes(b"http://a.example/\nnope\n", "targets", "csv")  # no header
    assert [(e.row, e.field) for e in parsed.errors] == [(2, "url")]


async def test_a_start_retried_with_its_idempotency_key_answers_the_same_upload(
    client: AsyncTestClient,
) -> None:
    body = {"name": "x", "kind": "targets", "format": "csv", "size": 10, "sha256": "0" * 64}
    key = {"Idempotency-Key": "start-1"}
    first = await client.post("/api/v1/datasets/uploads", json=body, headers=key)
    again = await client.post("/api/v1/datasets/uploads", json=body, headers=key)
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    other = await client.post("/api/v1/datasets/uploads", json={**body, "size": 11}, headers=key)
    assert other.status_code == 409 and other.json()["field"] == "Idempotency-Key"
    fresh = await client.post("/api/v1/datasets/uploads", json=body)
    assert fresh.json()["upload_id"] != first.json()["upload_id"]


def test_a_row_with_more_cells_than_the_header_is_refused_not_cut_short() -> None:
    parsed = parse_bytes(b"url\nhttp://a.example/?a=1,2\nhttp://b.example/\n", "targets", "csv")
    assert [(e.row, e.rule.split(" (")[0]) for e in parsed.errors] == [
        (2, "has 2 cells, the header 1")
    ]
    quoted = parse_bytes(b'url\n"http://a.example/?a=1,2"\n', "targets", "csv")
    assert quoted.errors == [] and quoted.rows == 1
