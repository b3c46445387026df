"""The egress allow rule: host, port and address in; allowed, or the reason why not."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from agents.egress.rule import (
    WEB_PORTS,
    IpAddress,
    Refusal,
    address_class,
    allow,
    allow_address,
    allow_destination,
    as_address,
    normal_host,
)

SITE = "site.test"
PUBLIC = ipaddress.ip_address("93.184.216.34")
HOSTS = frozenset({SITE, "127.0.0.1"})
PORTS = {SITE: WEB_PORTS | {8443}, "127.0.0.1": frozenset({8080})}


def addr(text: str) -> IpAddress:
    return ipaddress.ip_address(text)


def test_a_consented_host_on_a_consented_port_at_a_public_address_is_allowed() -> None:
    for port in (80, 443, 8443):
        assert allow(SITE, port, PUBLIC, HOSTS, PORTS) is None


def test_another_host_or_port_is_refused_before_any_address_is_looked_at() -> None:
    assert allow("evil.test", 443, PUBLIC, HOSTS, PORTS) is Refusal.HOST
    assert allow(SITE, 8080, PUBLIC, HOSTS, PORTS) is Refusal.PORT
    assert allow("127.0.0.1", 80, addr("127.0.0.1"), HOSTS, PORTS) is Refusal.PORT
    assert allow(SITE, 443, None, HOSTS, PORTS) is Refusal.UNRESOLVED


def test_a_host_without_recorded_ports_has_the_web_ports() -> None:
    assert allow_destination("other.test", 443, {"other.test"}, {}) is None
    assert allow_destination("other.test", 8443, {"other.test"}, {}) is Refusal.PORT


def test_names_are_compared_in_normal_form() -> None:
    assert allow("SITE.test.", 443, PUBLIC, HOSTS, PORTS) is None
    assert normal_host("[::1]") == "::1"


def test_non_public_addresses_are_refused_with_their_kind() -> None:
    cases = {
        "127.0.0.1": Refusal.LOOPBACK,
        "127.0.0.2": Refusal.LOOPBACK,
        "::1": Refusal.LOOPBACK,
        "10.1.2.3": Refusal.PRIVATE,
        "172.16.0.1": Refusal.PRIVATE,
        "192.168.1.1": Refusal.PRIVATE,
        "100.64.0.1": Refusal.PRIVATE,
        "fd12::1": Refusal.PRIVATE,
        "169.254.1.1": Refusal.LINK_LOCAL,
        "fe80::1": Refusal.LINK_LOCAL,
        "169.254.169.254": Refusal.METADATA,
        "fd00:ec2::254": Refusal.METADATA,
        "0.0.0.0": Refusal.RESERVED,
        "224.0.0.1": Refusal.RESERVED,
        "::ffff:127.0.0.1": Refusal.LOOPBACK,
        "::ffff:169.254.169.254": Refusal.METADATA,
    }
    for text, kind in cases.items():
        assert address_class(addr(text)) is kind, text
        assert allow(SITE, 443, addr(text), {SITE}, PORTS) is kind, text


def test_a_non_public_address_is_allowed_when_consented_as_that_very_address() -> None:
    assert allow("127.0.0.1", 8080, addr("127.0.0.1"), HOSTS, PORTS) is None
    assert allow_address(addr("::ffff:127.0.0.1"), 8080, HOSTS, PORTS) is None
    # a name that resolves there is not consent for the address ...
    assert allow(SITE, 443, addr("127.0.0.2"), HOSTS, PORTS) is Refusal.LOOPBACK
    # ... nor for another port of it
    assert allow(SITE, 443, addr("127.0.0.1"), HOSTS, PORTS) is Refusal.LOOPBACK
    loopback_on_443 = {**PORTS, "127.0.0.1": frozenset({443})}
    assert allow(SITE, 443, addr("127.0.0.1"), HOSTS, loopback_on_443) is None


def test_address_literals_parse_with_brackets_and_zones() -> None:
    assert as_address("[::1]") == addr("::1")
    assert as_address("fe80::1%eth0") == addr("fe80::1")
    assert as_address("site.test") is None


# -- properties ----------------------------------------------------------------------

names = st.from_regex(r"[a-z][a-z0-9-]{0,10}\.(test|example)", fullmatch=True)
ports = st.integers(min_value=1, max_value=65_535)
addresses = st.one_of(
    st.ip_addresses(v=4).map(lambda a: ipaddress.ip_address(str(a))),
    st.ip_addresses(v=6).map(lambda a: ipaddress.ip_address(str(a))),
)
consents = st.dictionaries(names, st.frozensets(ports, min_size=1, max_size=4), max_size=5)


@given(names, ports, addresses, consents)
def test_allowed_means_consented_host_and_port_and_an_acceptable_address(
    host: str, port: int, address: IpAddress, consent: dict[str, frozenset[int]]
) -> None:
    hosts = frozenset(consent)
    if allow(host, port, address, hosts, consent) is None:
        assert host in hosts and port in consent[host]
        assert address_class(address) is None


@given(names, ports, addresses, consents)
def test_refusal_comes_from_the_destination_before_the_address(
    host: str, port: int, address: IpAddress, consent: dict[str, frozenset[int]]
) -> None:
    hosts = frozenset(consent)
    destination = allow_destination(host, port, hosts, consent)
    verdict = allow(host, port, address, hosts, consent)
    if destination is not None:
        assert verdict is destination
    else:
        assert verdict is allow_address(address, port, hosts, consent)


@given(addresses, ports, consents)
def test_a_non_public_address_passes_only_when_it_is_itself_consented(
    address: IpAddress, port: int, consent: dict[str, frozenset[int]]
) -> None:
    literal = str(address)
    hosts = frozenset(consent)
    assert allow_address(address, port, hosts, consent) == address_class(address)
    with_it = {**consent, literal: frozenset({port})}
    assert allow_address(address, port, frozenset(with_it), with_it) is None


@given(names, ports, addresses, consents, consents)
def test_more_consent_never_refuses_what_less_allowed(
    host: str,
    port: int,
    address: IpAddress,
    less: dict[str, frozenset[int]],
    extra: dict[str, frozenset[int]],
) -> None:
    more = {h: less.get(h, frozenset()) | extra.get(h, frozenset()) for h in {*less, *extra}}
    if allow(host, port, address, frozenset(less), less) is None:
        assert allow(host, port, address, frozenset(more), more) is None
