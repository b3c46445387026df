"""How an admitted connection leaves the egress proxy, per the flow's current upstream:
directly for a host on its bypass list, by address (DNS ``local``), or by name to a
proxy that resolves names (DNS ``proxy``), the runner still checking every address it
finds for the name. Real sockets, no browser; names resolve through a table here (the
egress proxy's) and, for the upstreams, through tables of their own."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agents.egress.proxy import EgressProxy
from agents.egress.route import Route, on_bypass_list, route
from agents.egress.rule import IpAddress, Refusal
from agents.executor import AllowedHosts
from schemas.proxies import ProxyEndpoint, ProxyScheme, normal_bypass
from tests.proxies import LocalProxy, Secrets, http_proxy, socks5_proxy
from tests.test_egress_proxy import Origin, Refusals, chained, connect, register, site

__all__ = ["site"]  # fixture
pytestmark = pytest.mark.timeout(30)

# what the runner's resolver answers; 10.1.2.3 is private and consented nowhere
NAMES: dict[str, list[str]] = {
    "shop.test": ["127.0.0.1"],
    "www.shop.test": ["127.0.0.1"],
    "mixed.test": ["127.0.0.1", "10.1.2.3"],
    "gone.test": [],
}
# what the upstreams' own DNS answers
UPSTREAM_NAMES = {"shop.test": "127.0.0.1", "mixed.test": "127.0.0.1", "gone.test": "127.0.0.1"}


async def table(host: str, port: int) -> list[IpAddress]:
    return [ipaddress.ip_address(a) for a in NAMES.get(host, [])]


@pytest.fixture
async def proxy() -> AsyncIterator[EgressProxy]:
    p = EgressProxy(resolve=table)
    await p.start()
    yield p
    await p.close()


def endpoint(
    upstream: LocalProxy, scheme: ProxyScheme = "http", *, bypass: tuple[str, ...] = (), **kw: str
) -> ProxyEndpoint:
    return ProxyEndpoint(scheme, upstream.host, upstream.port, bypass=normal_bypass(bypass), **kw)  # type: ignore[arg-type]


def consented(site: Origin, *hosts: str) -> tuple[AllowedHosts, dict[str, frozenset[int]]]:
    return AllowedHosts(list(hosts)), {h: frozenset({site.port}) for h in hosts}


async def ask(proxy: EgressProxy, flow: object, host: str, port: int) -> int:
    status, _ = await (await connect(proxy)).ask(f"CONNECT {host}:{port} HTTP/1.1", flow)  # type: ignore[arg-type]
    return status


# -- the rule, pure --------------------------------------------------------------------


def test_a_bypass_entry_names_a_host_and_a_star_entry_its_subdomains() -> None:
    bypass = normal_bypass(["Shop.Test.", "*.cdn.test", "[::1]", "10.0.0.7"])
    assert bypass == ("shop.test", "*.cdn.test", "::1", "10.0.0.7")
    assert on_bypass_list("shop.test", bypass)
    assert not on_bypass_list("www.shop.test", bypass)
    assert on_bypass_list("a.cdn.test", bypass) and on_bypass_list("a.b.cdn.test", bypass)
    assert not on_bypass_list("cdn.test", bypass) and not on_bypass_list("xcdn.test", bypass)
    assert on_bypass_list("::1", bypass) and on_bypass_list("10.0.0.7", bypass)
    assert not on_bypass_list("10.0.0.8", bypass) and not on_bypass_list("shop.test", ())
    for bad in ("*", "*.", "a b.test", "*.10.0.0.1", "http://a.test"):
        with pytest.raises(ValueError, match="bypass"):
            normal_bypass([bad])


LABEL = st.sampled_from(["a", "b", "shop", "cdn", "test"])
NAME = st.lists(LABEL, min_size=1, max_size=4).map(".".join)


@given(host=NAME, entries=st.lists(st.tuples(st.booleans(), NAME), max_size=4))
def test_a_host_is_on_the_list_only_as_itself_or_below_a_star_entry(
    host: str, entries: list[tuple[bool, str]]
) -> None:
    bypass = tuple(f"*.{name}" if star else name for star, name in entries)
    expected = any(host.endswith(f".{name}") if star else host == name for star, name in entries)
    assert on_bypass_list(host, bypass) is expected


def test_the_route_is_the_current_upstreams() -> None:
    plain = ProxyEndpoint("http", "10.0.0.1", 3128)
    by_name = ProxyEndpoint("socks5", "10.0.0.1", 1080, dns="proxy", bypass=("shop.test",))
    assert route(None, "a.test", address_fixed=False) is Route.DIRECT
    assert route(plain, "a.test", address_fixed=False) is Route.BY_ADDRESS
    assert route(by_name, "a.test", address_fixed=False) is Route.BY_NAME
    assert route(by_name, "a.test", address_fixed=True) is Route.BY_ADDRESS
    assert route(by_name, "shop.test", address_fixed=False) is Route.DIRECT


# -- bypass ---------------------------------------------------------------------------


async def test_a_host_on_the_proxys_bypass_list_is_reached_directly_never_widening_consent(
    proxy: EgressProxy, site: Origin
) -> None:
    secrets = Secrets()
    async with http_proxy() as upstream:
        proxies, failures = chained(secrets, endpoint(upstream, bypass=("*.shop.test",)))
        hosts, ports = consented(site, "www.shop.test", "shop.test", "127.0.0.1")
        refusals = Refusals()
        flow = register(proxy, hosts, ports, refusals, proxies=proxies)

        client = await connect(proxy)
        assert (await client.ask(f"CONNECT www.shop.test:{site.port} HTTP/1.1", flow))[0] == 200
        assert await client.echo(b"direct\n") == b"direct\n"
        assert upstream.connections == 0 and site.connections == 1

        # not on the list: through the proxy, handed the address
        assert await ask(proxy, flow, "shop.test", site.port) == 200
        assert upstream.tunnels == [("127.0.0.1", site.port)]

        # on the list but not consented: refused, as without a list
        assert await ask(proxy, flow, "evil.shop.test", site.port) == 403
        assert refusals.seen[-1].reason is Refusal.HOST
        # consented as a name, its address not: refused whichever way it would leave
        loopback_only = register(
            proxy, *consented(site, "www.shop.test"), refusals, proxies=proxies
        )
        assert await ask(proxy, loopback_only, "www.shop.test", site.port) == 403
        assert refusals.seen[-1].reason is Refusal.LOOPBACK
    assert upstream.connections == 1 and site.connections == 2 and not failures


# -- DNS by the proxy -------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["http", "socks5"])
async def test_a_proxy_that_resolves_names_is_handed_the_name_once_the_runner_checked_it(
    proxy: EgressProxy, site: Origin, scheme: ProxyScheme
) -> None:
    secrets = Secrets()
    upstreams = {
        "http": http_proxy(names=UPSTREAM_NAMES),
        "socks5": socks5_proxy("u", "pw", names=UPSTREAM_NAMES),
    }
    async with upstreams[scheme] as upstream:
        credentials = {"username": "u", "password": "pw"} if scheme == "socks5" else {}
        proxies, failures = chained(secrets, endpoint(upstream, scheme, dns="proxy", **credentials))
        refusals = Refusals()
        hosts, ports = consented(
            site, "shop.test", "mixed.test", "gone.test", "mapped.test", "127.0.0.1"
        )
        flow = register(
            proxy, hosts, ports, refusals, proxies=proxies,
            host_map={"mapped.test": "127.0.0.1"},
        )  # fmt: skip

        client = await connect(proxy)
        assert (await client.ask(f"CONNECT shop.test:{site.port} HTTP/1.1", flow))[0] == 200
        assert await client.echo(b"by name\n") == b"by name\n"
        assert upstream.tunnels == [("shop.test", site.port)]

        # an IP literal and a name the job maps have no name to hand on: by address
        assert await ask(proxy, flow, "127.0.0.1", site.port) == 200
        assert await ask(proxy, flow, "mapped.test", site.port) == 200
        assert upstream.tunnels[1:] == [("127.0.0.1", site.port)] * 2

        # one answer the rule refuses (private, not consented): the name is not handed on,
        # though a runner resolving itself would connect to the other answer
        seen = upstream.connections
        assert await ask(proxy, flow, "mixed.test", site.port) == 403
        assert refusals.seen[-1].reason is Refusal.PRIVATE
        # a name the runner cannot resolve cannot be checked: refused
        assert await ask(proxy, flow, "gone.test", site.port) == 403
        assert refusals.seen[-1].reason is Refusal.UNRESOLVED
        assert upstream.connections == seen
    assert [(r.host, r.reason) for r in refusals.seen] == [
        ("mixed.test", Refusal.PRIVATE),
        ("gone.test", Refusal.UNRESOLVED),
    ]
    assert not failures and site.connections == 3


async def test_a_proxy_resolving_locally_gets_the_checked_address_of_a_mixed_name(
    proxy: EgressProxy, site: Origin
) -> None:
    secrets = Secrets()
    async with http_proxy() as upstream:
        proxies, _ = chained(secrets, endpoint(upstream))
        flow = register(
            proxy, *consented(site, "mixed.test", "127.0.0.1"), Refusals(), proxies=proxies
        )
        assert await ask(proxy, flow, "mixed.test", site.port) == 200
        assert upstream.tunnels == [("127.0.0.1", site.port)]
