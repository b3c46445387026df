"""Upstream proxies: where one is (its URL, checked), how its secret is stored, how it fails.

A proxy's credentials never enter the event log: ``ProxyRegistered`` says where the
proxy is and whether it has credentials; the whole endpoint, credentials included, is
stored under the proxy's id in the ``tb_proxy_secrets`` bucket, where runners (and the
engine's health check) read it. Nothing here ever puts a credential in a message,
an error or a ``repr``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal, get_args
from urllib.parse import unquote, urlsplit

import msgspec

from schemas.values import host_is_valid

ProxyScheme = Literal["http", "https", "socks5"]
SCHEMES: tuple[str, ...] = get_args(ProxyScheme)
MAX_CREDENTIAL_BYTES = 255  # SOCKS5 username/password authentication holds at most this

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
    scheme: ProxyScheme
    host: str
    port: int
    username: str = field(default="", repr=False)  # credentials never show in a repr
    password: str = field(default="", repr=False)

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


# -- the secrets bucket ---------------------------------------------------------------


class _StoredEndpoint(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    scheme: ProxyScheme
    host: str
    port: int
    username: str = ""
    password: str = ""


def encode_secret(endpoint: ProxyEndpoint) -> bytes:
    return msgspec.json.encode(
        _StoredEndpoint(
            endpoint.scheme, endpoint.host, endpoint.port, endpoint.username, endpoint.password
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
    return ProxyEndpoint(stored.scheme, stored.host, stored.port, stored.username, stored.password)
