"""Consent settings from the environment: the ceiling, the validity, the recheck interval
and the name server, each refused with the setting named when it makes no sense."""

from __future__ import annotations

from datetime import timedelta

import pytest

from cli.consent_settings import DEFAULT_CEILING, consent_policy_from_env
from engine.consent.dns_txt import NameServer
from schemas.values import ConsentCaps

SETTINGS = (
    "TB_CONSENT_MAX_SESSIONS",
    "TB_CONSENT_MAX_FLOWS_PER_MINUTE",
    "TB_CONSENT_VALIDITY",
    "TB_CONSENT_RECHECK",
    "TB_DNS_RESOLVER",
)


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)


def test_defaults_have_a_ceiling_and_ask_the_system_resolver() -> None:
    policy = consent_policy_from_env()
    assert policy.ceiling == DEFAULT_CEILING
    assert policy.dns.server is None
    assert (policy.validity, policy.recheck_every) == (timedelta(days=30), timedelta(hours=1))


def test_each_setting_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TB_CONSENT_MAX_SESSIONS", "3")
    monkeypatch.setenv("TB_CONSENT_MAX_FLOWS_PER_MINUTE", "30")
    monkeypatch.setenv("TB_CONSENT_VALIDITY", "60")
    monkeypatch.setenv("TB_CONSENT_RECHECK", "5")
    monkeypatch.setenv("TB_DNS_RESOLVER", "[::1]:5353")
    policy = consent_policy_from_env()
    assert policy.ceiling == ConsentCaps(max_concurrent=3, max_flows_per_minute=30)
    assert (policy.validity, policy.recheck_every) == (timedelta(minutes=1), timedelta(seconds=5))
    assert policy.dns.server == NameServer("::1", 5353)
    monkeypatch.setenv("TB_DNS_RESOLVER", "127.0.0.1")
    assert consent_policy_from_env().dns.server == NameServer("127.0.0.1", 53)


@pytest.mark.parametrize(
    ("name", "value", "said"),
    [
        ("TB_DNS_RESOLVER", "dns.example.com", "TB_DNS_RESOLVER: must be an IP address"),
        ("TB_DNS_RESOLVER", "127.0.0.1:99999", "TB_DNS_RESOLVER: must be an IP address"),
        ("TB_CONSENT_MAX_SESSIONS", "0", "TB_CONSENT_MAX_SESSIONS: must be at least 1"),
        ("TB_CONSENT_MAX_SESSIONS", "20000", "TB_CONSENT_MAX_SESSIONS: must be at most 10000"),
        ("TB_CONSENT_RECHECK", "soon", "TB_CONSENT_RECHECK: must be a number of seconds"),
    ],
)
def test_a_setting_that_makes_no_sense_stops_the_start_naming_it(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, said: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stopped:
        consent_policy_from_env()
    assert str(stopped.value).startswith(said)
