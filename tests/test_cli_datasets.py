"""``tb dataset upload`` and ``list`` against a served API on a real nats-server: a
progress bar, and an upload cut off midway resumed by running the command again."""

from __future__ import annotations

import asyncio
import urllib.error
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cli import datasets
from cli.credentials import auth_headers
from engine.datasets.uploads import UploadsConfig
from tests.api_client import admin_key, api_config, served
from tests.conftest import NatsServer

CHUNK = 16 * 1024


@pytest.fixture
async def api(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[str]:
    config = api_config(
        nats_server, tmp_path, db_path=tmp_path / "api.db", uploads=UploadsConfig(chunk_size=CHUNK)
    )
    async with served(config) as url:
        monkeypatch.setenv("TB_API_KEY", (await admin_key(url))["X-API-Key"])
        yield url


async def test_an_interrupted_upload_resumes_with_the_missing_chunks_only(
    api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "shop.csv"
    path.write_bytes(b"url\n" + b"".join(b"https://a.example/p/%d\n" % n for n in range(5000)))
    chunks = -(-path.stat().st_size // CHUNK)
    assert chunks >= 6
    sent: list[int] = []
    real = datasets.request

    def cut_off_after_three(method: str, url: str, **kw: Any) -> Any:
        if "/chunks/" in url:
            if len(sent) == 3:
                raise urllib.error.URLError("connection reset")
            sent.append(int(url.rsplit("/", 1)[1]))
        return real(method, url, **kw)

    state = tmp_path / "state"
    monkeypatch.setattr(datasets, "request", cut_off_after_three)
    code = await asyncio.to_thread(datasets.run_upload, api, path, "targets", None, state)
    assert code == 1 and "run it again to resume" in capsys.readouterr().err
    monkeypatch.setattr(datasets, "request", real)

    resumed: list[int] = []

    def counting(method: str, url: str, **kw: Any) -> Any:
        if "/chunks/" in url:
            resumed.append(int(url.rsplit("/", 1)[1]))
        return real(method, url, **kw)

    monkeypatch.setattr(datasets, "request", counting)
    code = await asyncio.to_thread(datasets.run_upload, api, path, "targets", None, state)
    out = capsys.readouterr()
    assert code == 0, out.err
    assert resumed == list(range(3, chunks))  # only what the first run did not send
    assert "5000 rows" in out.out and "shop.csv [" in out.err  # the progress bar
    assert datasets._remembered(state) == {}  # finished: nothing left to resume

    code = await asyncio.to_thread(datasets.run_list, api, None)
    listed = capsys.readouterr().out
    assert code == 0 and "shop" in listed and "5000 rows" in listed


async def test_a_bad_file_prints_its_rows(
    api: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(b"url,flowTarget\nhttp://a.example/,1\nnope,1\nhttp://b.example/,x\n")
    code = await asyncio.to_thread(datasets.run_upload, api, path, "targets", "bad", tmp_path)
    err = capsys.readouterr().err
    assert code == 1
    assert "row 3: url:" in err and "row 4: flow_target:" in err


def test_the_api_key_wins_over_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TB_API_KEY", raising=False)
    monkeypatch.delenv("TB_API_TOKEN", raising=False)
    assert auth_headers() == {}
    monkeypatch.setenv("TB_API_TOKEN", "tok")
    assert auth_headers() == {"Authorization": "Bearer tok"}
    monkeypatch.setenv("TB_API_KEY", "key")
    assert auth_headers() == {"X-API-Key": "key"}
