"""The parsers against arbitrary input: whatever the bytes, a file is either rows or a
list of problems naming rows, fields and rules; never an exception."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.datasets.parse import MAX_ERRORS, parse_file
from schemas.events import DatasetFormat, DatasetKind

CELLS = st.sampled_from(
    ["url", "URL", "Flow Target", "host", "port", "scheme", "http://a.example/", "https://b.example/x",
     "socks5://u:p@10.0.0.1:1080", "0", "7", "-1", "yes", "", " ", '"', ",", ";", "\t", "é", "\x00",
     "[", "{", "ftp://x", "http://", "999999"]
)  # fmt: skip
TEXT = st.lists(st.lists(CELLS, max_size=6).map("".join), max_size=30).map("\n".join)


def parsed(data: bytes, kind: DatasetKind, fmt: DatasetFormat) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"f.{fmt}"
        path.write_bytes(data)
        out = io.BytesIO()
        result = parse_file(path, kind, fmt, out)
    assert len(result.errors) <= MAX_ERRORS + 1
    if result.errors:
        assert all(e.rule for e in result.errors)
    else:
        assert result.rows == len(out.getvalue().splitlines()) > 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=TEXT,
    kind=st.sampled_from(["targets", "proxies"]),
    fmt=st.sampled_from(["csv", "txt", "json"]),
)
def test_any_table_text_is_rows_or_named_problems(
    text: str, kind: DatasetKind, fmt: DatasetFormat
) -> None:
    parsed(text.encode(), kind, fmt)


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=300), fmt=st.sampled_from(["csv", "txt", "json", "xlsx", "docx"]))
def test_any_bytes_are_rows_or_named_problems(data: bytes, fmt: DatasetFormat) -> None:
    parsed(data, "targets", fmt)


@settings(max_examples=100, deadline=None)
@given(
    doc=st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=12,
    ),
    kind=st.sampled_from(["devices", "settings", "targets", "proxies"]),
)  # fmt: skip
def test_any_json_is_rows_or_named_problems(doc: object, kind: DatasetKind) -> None:
    parsed(msgspec.json.encode(doc), kind, "json")


def test_proxy_rows_carry_enabled_bypass_and_dns_and_a_bad_bypass_entry_names_its_row() -> None:
    good = (
        b"scheme,host,port,enabled,bypass,dns\n"
        b"http,10.0.0.1,3128,no,,\n"
        b"socks5,10.0.0.2,1080,yes,a.example; *.cdn.example [::1],Proxy\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.csv"
        path.write_bytes(good)
        out = io.BytesIO()
        assert not parse_file(path, "proxies", "csv", out).errors
        first, second = [msgspec.json.decode(line) for line in out.getvalue().splitlines()]
        assert first == {"scheme": "http", "host": "10.0.0.1", "port": 3128, "enabled": False}
        assert second["bypass"] == ["a.example", "*.cdn.example", "[::1]"]
        assert second["dns"] == "proxy"
        path.write_bytes(b"scheme,host,port,bypass,dns\nhttp,10.0.0.1,3128,*.10.0.0.1,\n"
                         b"http,10.0.0.1,3128,,remote\n")  # fmt: skip
        problems = parse_file(path, "proxies", "csv", io.BytesIO()).errors
    assert [(p.row, p.field) for p in problems] == [(2, "bypass"), (3, "dns")]
    assert "must be a domain name" in problems[0].rule
