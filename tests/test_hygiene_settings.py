"""The hygiene settings: the names operators already use are aliases of ours (ours wins,
a disagreement is logged), sizes read as operators write them, origins are checked, and
no secret setting starts with a placeholder or guessable value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import structlog

from cli.secrets import refuse_placeholder
from cli.settings import (
    allowed_origins_from_env,
    body_limit_from_env,
    env_setting,
    http_policy_from_env,
    parse_size,
)

TB = [sys.executable, "-m", "cli.main"]
GOOD_KEY = "k3y-0f-my-own-2d8c1a9e"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "TB_BODY_LIMIT",
        "BODY_LIMIT",
        "TB_ALLOWED_ORIGINS",
        "ALLOWED_ORIGINS",
        "TB_CORS_CREDENTIALS",
        "TB_HSTS",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("raw", "size"),
    [("32768", 32768), ("32kb", 32768), ("32KB", 32768), ("1mb", 1024**2), ("64 KiB", 65536)],
)
def test_sizes_read_as_operators_write_them(raw: str, size: int) -> None:
    assert parse_size("TB_BODY_LIMIT", raw) == size


@pytest.mark.parametrize("raw", ["0", "-1", "lots", "32 tb", "2048mb"])
def test_a_bad_size_stops_naming_the_setting(raw: str) -> None:
    with pytest.raises(SystemExit, match=r"^BODY_LIMIT: must be a size"):
        parse_size("BODY_LIMIT", raw)


def test_the_alias_counts_when_ours_is_unset_and_ours_wins_a_disagreement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert body_limit_from_env() == 32 * 1024
    monkeypatch.setenv("BODY_LIMIT", "64kb")
    assert body_limit_from_env() == 64 * 1024
    monkeypatch.setenv("BODY_LIMIT", "many")
    with pytest.raises(SystemExit, match=r"^BODY_LIMIT: "):  # the name the operator set
        body_limit_from_env()
    monkeypatch.setenv("TB_BODY_LIMIT", "1mb")
    with structlog.testing.capture_logs() as logs:
        assert body_limit_from_env() == 1024**2
    assert logs == [
        {
            "event": "setting.alias_conflict",
            "used": "TB_BODY_LIMIT",
            "ignored": "BODY_LIMIT",
            "log_level": "warning",
        }
    ]
    monkeypatch.setenv("BODY_LIMIT", "1mb")  # the same value twice: nothing to say
    with structlog.testing.capture_logs() as logs:
        assert env_setting("TB_BODY_LIMIT", "BODY_LIMIT") == ("TB_BODY_LIMIT", "1mb")
    assert logs == []


def test_origins_are_normalised_as_browsers_send_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "ALLOWED_ORIGINS", "http://localhost:5151, HTTPS://Dash.Example.com:443/, http://[::1]:80"
    )
    assert allowed_origins_from_env() == (
        "http://localhost:5151",
        "https://dash.example.com",
        "http://[::1]",
    )


@pytest.mark.parametrize(
    "raw",
    ["localhost:5151", "ftp://x.example", "https://x.example/app", "https://*.example.com",
     "https://user@x.example", "http://x.example:99999"],
)  # fmt: skip
def test_a_bad_origin_stops_naming_the_setting(raw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TB_ALLOWED_ORIGINS", f"https://ok.example, {raw}")
    with pytest.raises(SystemExit, match=r"^TB_ALLOWED_ORIGINS: "):
        allowed_origins_from_env()


def test_any_origin_with_credentials_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALLOWED_ORIGINS", "*")
    with pytest.raises(SystemExit, match=r"^ALLOWED_ORIGINS: '\*' with credentials"):
        http_policy_from_env()
    monkeypatch.setenv("TB_CORS_CREDENTIALS", "false")
    policy = http_policy_from_env()
    assert policy.allowed_origins == ("*",) and not policy.cors_credentials


@pytest.mark.parametrize(
    "value",
    ["secure-runner-key-CHANGE-ME", "changeme", "secret", "password", "admin",
     "xxxxxxxxxxxxxxxxxxxx", "short-key-123", "your-key-here-REPLACE_ME-please"],
)  # fmt: skip
def test_placeholders_and_weak_secrets_are_refused_naming_the_setting(value: str) -> None:
    with pytest.raises(SystemExit) as refused:
        refuse_placeholder("TB_RUNNER_KEY", value)
    message = str(refused.value)
    assert message.startswith("TB_RUNNER_KEY: refused: ")
    assert repr(value) not in message and (len(value) < 8 or value not in message)


def test_a_secret_of_ones_own_is_kept_and_a_password_may_be_shorter() -> None:
    assert refuse_placeholder("TB_INGEST_API_KEY", GOOD_KEY) == GOOD_KEY
    assert refuse_placeholder("TB_ADMIN_PASSWORD", "Tr0ub4dor&3", min_length=10) == "Tr0ub4dor&3"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"TB_INGEST_API_KEY": "secure-runner-key-CHANGE-ME"}, "TB_INGEST_API_KEY: refused"),
        ({"BODY_LIMIT": "huge"}, "BODY_LIMIT: must be a size"),
        ({"TB_ADMIN_PASSWORD": "admin-CHANGE-ME"}, "TB_ADMIN_PASSWORD: refused"),
    ],
)
def test_tb_api_stops_at_start_naming_the_bad_setting(env: dict[str, str], named: str) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TB_")}
    result = subprocess.run(
        [*TB, "api", "--nats-url", "nats://127.0.0.1:1", "--db", "/nonexistent/read.db"],
        env={**base, **env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert named in result.stderr, result.stderr
    assert "CHANGE-ME" not in result.stderr  # the value itself is not repeated


def test_tb_up_stops_before_starting_anything_on_a_placeholder_key(tmp_path: Path) -> None:
    env = {**os.environ, "TB_INGEST_API_KEY": "secure-runner-key-CHANGE-ME"}
    result = subprocess.run(
        [*TB, "up", "--state-dir", str(tmp_path / "tb"), "--port", "1", "--nats-port", "2"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "TB_INGEST_API_KEY: refused" in result.stderr, result.stderr
    assert not (tmp_path / "tb").exists()  # no state dir, no nats-server, no child


def test_number_and_switch_settings_take_aliases_too(monkeypatch: pytest.MonkeyPatch) -> None:
    from cli.settings import _bool, _float

    monkeypatch.setenv("GRACE_PERIOD", "45")
    assert _float("TB_SESSION_GRACE", 30.0, aliases=("GRACE_PERIOD",)) == 45.0
    monkeypatch.setenv("GRACE_PERIOD", "soon")
    with pytest.raises(SystemExit, match=r"^GRACE_PERIOD: must be a number"):
        _float("TB_SESSION_GRACE", 30.0, aliases=("GRACE_PERIOD",))
    monkeypatch.setenv("AUTH_ENABLED", "false")
    assert _bool("TB_AUTH_ENABLED", True, aliases=("AUTH_ENABLED",)) is False


def test_a_runner_stops_on_a_placeholder_key_before_asking_the_api() -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TB_")}
    result = subprocess.run(
        [*TB, "runner", "--api", "http://127.0.0.1:1"],
        env={**base, "RUNNER_API_KEY": "secure-runner-key-CHANGE-ME"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "RUNNER_API_KEY: refused" in result.stderr, result.stderr
