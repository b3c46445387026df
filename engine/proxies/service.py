"""Proxy commands at the edge: register and retire, read-decide-append on ``tb.proxy.<id>.*``.

Registering stores the endpoint with its credentials, bypass list and DNS setting in the
secrets bucket first (only if nothing else is stored under the id), then appends
``ProxyRegistered``, which says where the proxy is, how flows use it and whether it has
credentials, never what they are. A runner that finds the id in a work item therefore
always finds its secret, and with it how to use the proxy. Retiring appends
``ProxyRetired``, then purges the secret.

Every command carries an id (the caller's ``Idempotency-Key``, or one minted once per
request): a retry answers what its first run stored, a keyed registration always names
the same proxy.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from engine.bus import Appended, Bus, Expect, applied_by, retry_on_conflict
from engine.errors import CommandIdReused, Invalid
from engine.proxies.decider import Meta, ProxyCommand, RegisterProxy, RetireProxy, decide
from engine.proxies.secrets import ProxySecrets, SecretTaken
from schemas import subjects
from schemas.events import Envelope, ProxyRegistered, ProxyRetired
from schemas.ids import ID_RULE, is_valid_id, new_id, short_id, utcnow
from schemas.proxies import ProxyDns, ProxyUrlInvalid, normal_bypass, parse_proxy_url
from schemas.proxy_state import ProxyState, evolve_proxy


def checked_proxy_id(proxy_id: str) -> str:
    """The id, if it is one: it becomes a subject token (``tb.proxy.<id>.*``)."""
    if not is_valid_id(proxy_id):
        raise Invalid("proxy_id", ID_RULE)
    return proxy_id


def proxy_id_for(command_id: str) -> str:
    """The proxy a keyed registration makes: a retry of it names the same proxy."""
    return f"proxy_{hashlib.blake2b(command_id.encode(), digest_size=10).hexdigest()}"


@dataclass
class ProxyCommands:
    bus: Bus
    secrets: ProxySecrets
    clock: Callable[[], datetime] = utcnow

    async def load(self, proxy_id: str) -> ProxyState:
        return (await self._history(checked_proxy_id(proxy_id), None))[0]

    async def register(
        self,
        url: str,
        label: str | None,
        actor: str,
        command_id: str | None = None,
        *,
        bypass: Iterable[str] = (),
        dns: ProxyDns = "local",
    ) -> tuple[ProxyRegistered, Appended]:
        """A new proxy; ``Invalid`` naming ``url`` (or ``bypass``) and the rule when the
        URL is not one (or an entry is not a host)."""
        try:
            endpoint = parse_proxy_url(url)
        except ProxyUrlInvalid as err:
            raise Invalid("url", err.rule) from None
        try:
            endpoint = dataclasses.replace(endpoint, bypass=normal_bypass(bypass), dns=dns)
        except ValueError as err:
            raise Invalid("bypass", str(err).removeprefix("bypass ")) from None
        if command_id is None:
            command, proxy_id = new_id(), short_id("proxy")
        else:
            command, proxy_id = command_id, proxy_id_for(command_id)
        cmd = RegisterProxy(
            proxy_id,
            endpoint.scheme,
            endpoint.host,
            endpoint.port,
            endpoint.has_credentials,
            label,
            endpoint.bypass,
            endpoint.dns,
        )

        async def attempt() -> tuple[ProxyRegistered, Appended]:
            proxy, stored = await self._history(proxy_id, command)
            if not stored:
                try:
                    await self.secrets.store(proxy_id, endpoint)
                except SecretTaken:
                    raise CommandIdReused("a registration of another proxy URL") from None
                stored = await self._append(proxy, cmd, actor, command)
            event = stored[-1].event
            if not isinstance(event, ProxyRegistered):
                raise CommandIdReused(type(event).__name__)
            if _where_and_how(event) != (cmd.scheme, cmd.host, cmd.port, cmd.bypass, cmd.dns):
                raise CommandIdReused("a registration of another proxy URL")
            return event, _appended(stored)

        return await retry_on_conflict(attempt)

    async def retire(
        self, proxy_id: str, reason: str, actor: str, command_id: str | None = None
    ) -> Appended:
        """The proxy is never handed out again and its secret is purged."""
        proxy_id = checked_proxy_id(proxy_id)
        command = command_id or new_id()

        async def attempt() -> Appended:
            proxy, stored = await self._history(proxy_id, command)
            if not stored:
                stored = await self._append(proxy, RetireProxy(proxy_id, reason), actor, command)
            if not isinstance(stored[-1].event, ProxyRetired):
                raise CommandIdReused(type(stored[-1].event).__name__)
            await self.secrets.purge(proxy_id)  # again on a retry: a purge is idempotent
            return _appended(stored)

        return await retry_on_conflict(attempt)

    async def _history(
        self, proxy_id: str, command_id: str | None
    ) -> tuple[ProxyState, list[Envelope]]:
        """The proxy, and the events ``command_id`` stored if that command ran before."""
        envelopes = await self.bus.load(subjects.proxy_stream_filter(proxy_id))
        proxy = ProxyState()
        for env in envelopes:
            proxy = evolve_proxy(proxy, env.event, env.seq)
        if command_id is None or applied_by(envelopes, command_id) is None:
            return proxy, []
        prefix = subjects.command_msg_id(command_id, 0).removesuffix("0")
        return proxy, [env for env in envelopes if env.msg_id.startswith(prefix)]

    async def _append(
        self, proxy: ProxyState, cmd: ProxyCommand, actor: str, command: str
    ) -> list[Envelope]:
        """Append at the version ``proxy`` was read at (``ConcurrencyConflict`` if it moved)."""
        scope = subjects.proxy_stream_filter(cmd.proxy_id)
        meta = Meta(id=new_id(), at=self.clock(), actor=actor)
        expected = proxy.version
        stored: list[Envelope] = []
        for n, event in enumerate(decide(proxy, cmd, meta)):
            msg_id = subjects.command_msg_id(command, n)
            appended = await self.bus.append(event, msg_id=msg_id, expect=Expect(scope, expected))
            if appended.duplicate:
                # an earlier run of this very command stored it: answer what that stored
                before = (await self._history(cmd.proxy_id, command))[1]
                if not before:
                    raise CommandIdReused("on another proxy")
                return before
            stored.append(Envelope(appended.seq, subjects.subject_for(event), event, msg_id))
            expected = appended.seq
        return stored


def _where_and_how(event: ProxyRegistered) -> tuple[object, ...]:
    return (event.scheme, event.host, event.port, tuple(event.bypass), event.dns)


def _appended(stored: list[Envelope]) -> Appended:
    return Appended(seq=stored[-1].seq, duplicate=True)
