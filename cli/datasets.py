"""``tb dataset upload`` and ``tb dataset list``: the API's chunked upload from the shell.

An upload is remembered per file (its absolute path and sha256) in
``<state-dir>/uploads.json``: run the same command again after an interruption and it
asks the API which chunks are missing and sends only those.
"""

from __future__ import annotations

import hashlib
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cli.commands import ProgressBar
from cli.credentials import auth_headers

FORMATS = {".csv": "csv", ".txt": "txt", ".xlsx": "xlsx", ".docx": "docx", ".json": "json"}
UPLOADS_FILE = "uploads.json"
FINISH_WAIT = 3600.0


class ApiRefused(Exception):
    def __init__(self, status: int, body: Any) -> None:
        detail = body.get("detail") if isinstance(body, dict) else body
        super().__init__(f"{status}: {detail}")
        self.status, self.body = status, body


def request(
    method: str,
    url: str,
    *,
    body: object | None = None,
    raw: bytes | None = None,
    timeout: float = 120.0,
) -> Any:
    """One API call with the CLI's credentials; ``ApiRefused`` for a 4xx or 5xx."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=auth_headers())
    if body is not None:
        req.add_header("Content-Type", "application/json")
    elif raw is not None:
        req.add_header("Content-Type", "application/octet-stream")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            text = response.read()
            return json.loads(text) if text else None
    except urllib.error.HTTPError as err:
        text = err.read()
        try:
            answer = json.loads(text) if text else None
        except ValueError:
            answer = text.decode("utf-8", "replace")
        raise ApiRefused(err.code, answer) from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _remembered(state_dir: Path) -> dict[str, str]:
    try:
        loaded = json.loads((state_dir / UPLOADS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in loaded.items()} if isinstance(loaded, dict) else {}


def _remember(state_dir: Path, key: str, upload_id: str | None) -> None:
    known = _remembered(state_dir)
    if upload_id is None:
        known.pop(key, None)
    else:
        known[key] = upload_id
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / UPLOADS_FILE).write_text(json.dumps(known, indent=1))


def upload(
    api: str, path: Path, kind: str, name: str | None, state_dir: Path, fmt: str | None = None
) -> dict[str, Any]:
    """Upload (or resume uploading) ``path``; the finish's answer."""
    fmt = fmt or FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise SystemExit(f"tb dataset upload: cannot tell the format of {path.name}: use --format")
    size = path.stat().st_size
    sha256 = file_sha256(path)
    key = f"{path.resolve()}:{sha256}"
    base = f"{api.rstrip('/')}/api/v1/datasets/uploads"
    view = None
    if upload_id := _remembered(state_dir).get(key):
        try:
            view = request("GET", f"{base}/{upload_id}")
        except ApiRefused as refused:
            if refused.status != 404:
                raise
    if view is None:
        started = request(
            "POST",
            base,
            body={"name": name or path.stem, "kind": kind, "format": fmt, "size": size,
                  "sha256": sha256},
        )  # fmt: skip
        upload_id = started["upload_id"]
        _remember(state_dir, key, upload_id)
        view = request("GET", f"{base}/{upload_id}")
    elif view.get("finished"):
        _remember(state_dir, key, None)
        return dict(view["finished"])
    chunk_size, missing = int(view["chunk_size"]), list(view["missing"])
    bar = ProgressBar(path.name, size)
    done = size - sum(min(chunk_size, size - i * chunk_size) for i in missing)
    bar.update(done, suffix="bytes")
    with path.open("rb") as f:
        for index in missing:
            f.seek(index * chunk_size)
            chunk = f.read(chunk_size)
            request("PUT", f"{base}/{upload_id}/chunks/{index}", raw=chunk)
            done += len(chunk)
            bar.update(done, suffix="bytes")
    bar.finish()
    # the finish parses and checks every row before it answers: a large file takes a while
    finished: dict[str, Any] = request("POST", f"{base}/{upload_id}/finish", timeout=FINISH_WAIT)
    _remember(state_dir, key, None)
    return finished


def run_upload(api: str, path: Path, kind: str, name: str | None, state_dir: Path) -> int:
    if not path.is_file():
        print(f"tb dataset upload: no file {path}", file=sys.stderr)
        return 2
    try:
        finished = upload(api, path, kind, name, state_dir)
    except ApiRefused as refused:
        print(f"tb dataset upload: refused {refused}", file=sys.stderr)
        body = refused.body
        for problem in body.get("errors", []) if isinstance(body, dict) else []:
            where = problem.get("place") or f"row {problem.get('row')}"
            print(f"  {where}: {problem.get('field')}: {problem.get('rule')}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as err:
        print(f"tb dataset upload: interrupted ({err}); run it again to resume", file=sys.stderr)
        return 1
    print(
        f"dataset {finished['dataset_id']} version {finished['version']}: {finished['rows']} rows"
    )
    for warning in finished.get("warnings", []):
        print(f"  warning: {warning.get('place') or warning.get('row')}: {warning.get('rule')}")
    return 0


def run_list(api: str, kind: str | None) -> int:
    url = f"{api.rstrip('/')}/api/v1/datasets?limit=500" + (f"&kind={kind}" if kind else "")
    try:
        datasets = request("GET", url)
    except (ApiRefused, urllib.error.URLError, OSError) as err:
        print(f"tb dataset list: {err}", file=sys.stderr)
        return 1
    for d in datasets:
        print(
            f"{d['dataset_id']}  {d['kind']:<8}  v{d['latest_version']:<3} {d['rows']:>9} rows"
            f"  {d['owner']:<12}  {d['name']}"
        )
    return 0
