"""Proxy URLs: every well-formed one parses back to its parts, and no refusal ever repeats
a credential, wherever in the URL it was put."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.proxies import (
    ProxyEndpoint,
    ProxyUrlInvalid,
    decode_secret,
    encode_secret,
    parse_proxy_url,
)

MARK = "Zq7Xw"  # no rule's wording holds it: a message with it repeats a credential
credential = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=0, max_size=20
).map(lambda t: MARK + t)
hosts = st.sampled_from(["127.0.0.1", "proxy.example", "::1", "a-b.example.org"])
schemes = st.sampled_from(["http", "https", "socks5", "HTTP"])
ports = st.integers(min_value=1, max_value=65535)


@settings(max_examples=150, deadline=None)
@given(schemes, credential, credential, hosts, ports)
def test_well_formed_urls_parse_to_their_parts(
    scheme: str, user: str, password: str, host: str, port: int
) -> None:
    authority = f"[{host}]" if ":" in host else host
    url = f"{scheme}://{quote(user, safe='')}:{quote(password, safe='')}@{authority}:{port}"
    endpoint = parse_proxy_url(url)
    assert endpoint == ProxyEndpoint(scheme.lower(), host, port, user, password)  # type: ignore[arg-type]
    assert decode_secret(encode_secret(endpoint)) == endpoint
    assert MARK not in repr(endpoint) and MARK not in endpoint.label


@settings(max_examples=250, deadline=None)
@given(
    st.lists(
        st.one_of(
            credential,
            st.sampled_from(["http://", "socks5://", "ftp://", "@", ":", "/", "?", "#", " "]),
            hosts,
            ports.map(str),
            st.text(max_size=5),
        ),
        max_size=8,
    )
)
def test_no_refusal_repeats_a_credential(parts: list[str]) -> None:
    url = "".join(parts)
    try:
        parse_proxy_url(url)
    except ProxyUrlInvalid as err:
        assert MARK not in str(err) and MARK not in err.rule


def test_a_stored_endpoint_keeps_its_bypass_list_and_dns_and_a_plain_one_reads_as_before() -> None:
    endpoint = ProxyEndpoint("socks5", "10.0.0.1", 1080, "u", "pw", ("a.test", "*.b.test"), "proxy")
    assert decode_secret(encode_secret(endpoint)) == endpoint
    plain = ProxyEndpoint("http", "10.0.0.1", 3128)
    # what a runner that knows no bypass list or DNS setting reads, written as before
    assert encode_secret(plain) == b'{"scheme":"http","host":"10.0.0.1","port":3128}'
    # a field a runner does not know how to apply makes the secret unreadable: such a
    # runner fails the flow closed rather than ignore it
    unknown = b'{"scheme":"http","host":"10.0.0.1","port":3128,"route":"x"}'
    for data in (unknown, encode_secret(plain).replace(b"}", b',"bypass":["*.10.0.0.1"]}')):
        with pytest.raises(ValueError, match="not a"):
            decode_secret(data)
