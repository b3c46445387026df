"""Upstream proxies: where one is (its URL, checked), how its secret is stored, how it fails.

A proxy's credentials never enter the event log: ``ProxyRegistered`` says where the
proxy is, whether it has credentials and how flows use it (its bypass list and DNS
setting); the whole endpoint, credentials included, is stored under the proxy's id in
the ``tb_proxy_secrets`` bucket, where runners (and the engine's health check) read it.
Nothing here ever puts a credential in a message, an error or a ``repr``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, get_args
from urllib.parse import unquote, urlsplit

import msgspec

from schemas.values import host_is_valid

ProxyScheme = Literal["http", "https", "socks5"]
SCHEMES: tuple[str, ...] = get_args(ProxyScheme)
MAX_CREDENTIAL_BYTES = 255  # SOCKS5 username/password authentication holds at most this
# where a flow's names are resolved when it goes through the proxy: by the runner, which
# hands the proxy the address it checked, or by the proxy, which is handed the name
ProxyDns = Literal["local", "proxy"]
MAX_BYPASS = 100  # hosts on one proxy's bypass list
BYPASS_RULE = "must be a domain name, *. and a domain name, or an IP address"

ProxyErrorKind = Literal["unreachable", "timeout", "auth", "refused", "protocol", "no_secret"]

URL_SHAPE = "must be scheme://[user:password@]host:port with scheme http, https or socks5"
CREDENTIALS_PLACE = "credentials go before the host: scheme://user:password@host:port"


class ProxyUrlInvalid(ValueError):
    """A proxy URL that breaks ``rule``; the message never repeats the URL (it may hold a
    password)."""

    def __init__(self, rule: str) -> None:
        super().__init__(rule)
        self.rule = rule


class ProxyError(Exception):
    """A connection through a proxy failed because of the proxy (not the site behind it).

    ``kind`` is what ``ProxyFailed.error`` records; the message names the proxy by its
    label (scheme, host and port), never by its credentials.
    """

    def __init__(self, kind: ProxyErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind: ProxyErrorKind = kind


@dataclass(frozen=True)
class ProxyEndpoint:
    """Where a proxy is, its credentials, and how flows use it: ``bypass`` are hosts its
    flows reach directly (normal form, ``normal_bypass``), ``dns`` who resolves names."""

    scheme: ProxyScheme
    host: str
    port: int
    username: str = field(default="", repr=False)  # credentials never show in a repr
    password: str = field(default="", repr=False)
    bypass: tuple[str, ...] = ()
    dns: ProxyDns = "local"

    @property
    def has_credentials(self) -> bool:
        return bool(self.username or self.password)

    @property
    def label(self) -> str:
        """``scheme://host:port``: how logs and events name it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_proxy_url(url: str) -> ProxyEndpoint:
    """The endpoint ``url`` names, or ``ProxyUrlInvalid`` naming the rule it breaks."""
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise ProxyUrlInvalid(f"{URL_SHAPE} (no spaces or control characters)")
    if "://" not in url:
        raise ProxyUrlInvalid(URL_SHAPE)
    scheme = url.split("://", 1)[0].lower()
    if scheme not in SCHEMES:
        # the scheme is not repeated: in "user:pass@host" it would be a username
        raise ProxyUrlInvalid("scheme must be http, https or socks5")
    try:
        parts = urlsplit(url)
    except ValueError:  # an unbalanced "[" or "]"
        raise ProxyUrlInvalid("host must be a domain name or an IP address ([IPv6])") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ProxyUrlInvalid(f"must have no path, query or fragment ({CREDENTIALS_PLACE})")
    try:
        port = parts.port
    except ValueError:
        # its message would quote what follows the host, a password in "host:port:user:pass"
        raise ProxyUrlInvalid(
            f"port must be a number 1-65535 ({CREDENTIALS_PLACE}, not after the port)"
        ) from None
    host = parts.hostname or ""
    if not host or not host_is_valid(host):
        raise ProxyUrlInvalid("host must be a domain name or an IP address")
    if port is None:
        raise ProxyUrlInvalid("port must be given: scheme://host:port")
    if not 1 <= port <= 65535:
        raise ProxyUrlInvalid("port must be 1-65535")
    username = password = ""
    if "@" in parts.netloc:
        userinfo = parts.netloc.rpartition("@")[0]
        user, colon, secret = userinfo.partition(":")
        username, password = unquote(user), unquote(secret)
        if not colon or not username or not password:
            raise ProxyUrlInvalid(
                f"credentials must be user:password, both given ({CREDENTIALS_PLACE})"
            )
        if max(len(username.encode()), len(password.encode())) > MAX_CREDENTIAL_BYTES:
            raise ProxyUrlInvalid(
                f"username and password must be at most {MAX_CREDENTIAL_BYTES} bytes each"
            )
    if _is_ip(host):
        host = str(ipaddress.ip_address(host))
    return ProxyEndpoint(scheme, host.lower(), port, username, password)  # type: ignore[arg-type]


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def normal_bypass_entry(entry: str) -> str:
    """A bypass entry in the form hosts are compared in (lower case, no trailing dot, an
    IPv6 address without brackets and in its short form); ``ValueError`` naming the rule."""
    text = entry.strip().lower().rstrip(".")
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if _is_ip(text):
        return str(ipaddress.ip_address(text))
    name = text.removeprefix("*.")
    if not name or _is_ip(name) or not host_is_valid(name):
        raise ValueError(f"bypass {entry!r} {BYPASS_RULE}")
    return text


def normal_bypass(entries: Iterable[str]) -> tuple[str, ...]:
    """The entries in normal form, each once, in their order; ``ValueError`` naming the
    first that is not a host."""
    found: dict[str, None] = {}
    for entry in entries:
        found.setdefault(normal_bypass_entry(entry))
    if len(found) > MAX_BYPASS:
        raise ValueError(f"bypass must list at most {MAX_BYPASS} hosts")
    return tuple(found)


# -- the secrets bucket ---------------------------------------------------------------


# Unknown fields are refused: a runner that does not know how to apply a field (a bypass
# list, DNS by the proxy) finds the secret unreadable and fails the flow closed. Defaults
# are left out, so a plain endpoint reads the same to every runner.
class _StoredEndpoint(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    scheme: ProxyScheme
    host: str
    port: int
    username: str = ""
    password: str = ""
    bypass: list[str] = []
    dns: ProxyDns = "local"


def encode_secret(endpoint: ProxyEndpoint) -> bytes:
    return msgspec.json.encode(
        _StoredEndpoint(
            endpoint.scheme,
            endpoint.host,
            endpoint.port,
            endpoint.username,
            endpoint.password,
            list(endpoint.bypass),
            endpoint.dns,
        )
    )


def decode_secret(data: bytes) -> ProxyEndpoint:
    """The stored endpoint; ``ValueError`` (never quoting the value) when it is not one,
    or not one ``parse_proxy_url`` would have accepted (a port out of range makes the
    connect raise ``OverflowError``, an overlong credential breaks SOCKS5 framing)."""
    try:
        stored = msgspec.json.decode(data, type=_StoredEndpoint)
    except msgspec.DecodeError:
        raise ValueError("not a stored proxy endpoint") from None
    credentials = (stored.username.encode(), stored.password.encode())
    if (
        not host_is_valid(stored.host)
        or not 1 <= stored.port <= 65535
        or max(map(len, credentials)) > MAX_CREDENTIAL_BYTES
    ):
        raise ValueError("not a usable proxy endpoint")
    try:
        bypass = normal_bypass(stored.bypass)
    except ValueError:
        raise ValueError("not a usable bypass list") from None
    return ProxyEndpoint(
        stored.scheme,
        stored.host,
        stored.port,
        stored.username,
        stored.password,
        bypass,
        stored.dns,
    )
