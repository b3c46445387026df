"""NATS with authorization: the users, their permissions, the server's configuration,
and keeping it current as runner keys come and go.

The process that owns nats-server (``tb up``; in scaled mode the same on every node, see
deploy/README.md) writes the configuration, starts the server with ``-c`` and, whenever
the runner-keys bucket changes, writes it again and signals a reload (SIGHUP): a revoked
key's user is gone and its connections are closed. Passwords are in the file as bcrypt
hashes; the file is mode 0600 all the same. The local users' passwords are generated on
first start and kept in ``<state-dir>/nats/credentials.json`` (0600).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from engine import nats_permissions
from engine.bus import Bus
from engine.nats_permissions import Permissions
from engine.runner_keys import RunnerKeyRecord, bcrypt_hash, watch_records

log = structlog.get_logger("tb.nats")

ENGINE, API, AUDITOR, OPS = "engine", "api", "auditor", "ops"
USER_ENV, PASSWORD_ENV = "TB_NATS_USER", "TB_NATS_PASSWORD"
RECONCILE_EVERY = 30.0  # seconds: the watch is renewed even if it never said it broke


def local_runner_id(n: int) -> str:
    return f"runner_local_{n}"


@dataclass(frozen=True)
class NatsUser:
    name: str
    password_bcrypt: str
    permissions: Permissions

    def as_config(self) -> dict[str, object]:
        user: dict[str, object] = {"user": self.name, "password": self.password_bcrypt}
        permissions = self.permissions.as_config()
        if permissions:
            user["permissions"] = permissions
        return user


def write_private(path: Path, text: str) -> None:
    """Write ``text`` readable by its owner only, atomically (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


class LocalCredentials:
    """Passwords of the users a ``tb up`` keeps for itself, made once, kept 0600."""

    def __init__(self, directory: Path, local_runners: int) -> None:
        self.directory = directory
        self.path = directory / "credentials.json"
        self.names = [ENGINE, API, AUDITOR, OPS] + [
            local_runner_id(n) for n in range(1, local_runners + 1)
        ]
        self.passwords = self._load_or_create()
        self._hashes: dict[str, str] = {}  # one salt per run: a reload sees the same users

    def _load_or_create(self) -> dict[str, str]:
        known: dict[str, str] = {}
        with contextlib.suppress(FileNotFoundError, ValueError):
            loaded = json.loads(self.path.read_text(encoding="utf-8"))
            if isinstance(loaded, dict):
                known = {str(k): str(v) for k, v in loaded.items()}
        missing = [name for name in self.names if name not in known]
        for name in missing:
            known[name] = secrets.token_urlsafe(32)
        if missing or not self.path.exists():
            write_private(self.path, json.dumps(known, indent=2) + "\n")
        return known

    def env(self, name: str) -> dict[str, str]:
        """The environment a child connects with (never its command line: ``ps`` shows it)."""
        return {USER_ENV: name, PASSWORD_ENV: self.passwords[name]}

    def url(self, name: str, host: str, port: int) -> str:
        return f"nats://{name}:{self.passwords[name]}@{host}:{port}"

    def users(self, local_platform: tuple[str, str]) -> list[NatsUser]:
        def user(name: str, permissions: Permissions) -> NatsUser:
            if name not in self._hashes:
                self._hashes[name] = bcrypt_hash(self.passwords[name])
            return NatsUser(name, self._hashes[name], permissions)

        made = [
            user(ENGINE, nats_permissions.full_access()),
            user(API, nats_permissions.full_access()),
            user(AUDITOR, nats_permissions.auditor()),
            user(OPS, nats_permissions.ops()),
        ]
        os_name, browser = local_platform
        made += [
            user(name, nats_permissions.runner(name, os_name, browser))
            for name in self.names
            if name.startswith("runner_local_")
        ]
        return made


def runner_key_users(records: Mapping[str, RunnerKeyRecord]) -> list[NatsUser]:
    """One user per runner key that has declared its platform (at its first exchange)."""
    return [
        NatsUser(
            record.runner_id,
            record.nats_password_bcrypt,
            nats_permissions.runner(record.runner_id, record.platform.os, record.platform.browser),
        )
        for record in sorted(records.values(), key=lambda r: r.key_id)
        if record.platform is not None
    ]


def render_config(
    *,
    host: str,
    port: int,
    store_dir: Path,
    server_name: str,
    users: list[NatsUser],
    extra: Mapping[str, object] | None = None,
) -> str:
    """A nats-server configuration (its format reads JSON) with JetStream and the users."""
    config: dict[str, object] = {
        "host": host,
        "port": port,
        "server_name": server_name,
        "jetstream": {"store_dir": str(store_dir)},
        "authorization": {"users": [u.as_config() for u in users]},
        **(extra or {}),
    }
    return json.dumps(config, indent=2) + "\n"


def credentials_from_env(url: str, env: Mapping[str, str] | None = None) -> str:
    """``url`` with the user and password a parent gave through the environment, if any."""
    env = os.environ if env is None else env
    user, password = env.get(USER_ENV), env.get(PASSWORD_ENV)
    if not user or not password or "@" in url:
        return url
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "nats", url
    return f"{scheme}://{user}:{password}@{rest}"


def with_local_credentials(nats_dir: Path, url: str, user: str = ENGINE) -> str:
    """``url`` with the password a ``tb up`` keeps in ``nats_dir`` for ``user``, when it
    keeps one (a state dir whose NATS runs with authorization); else ``url`` as it is."""
    try:
        passwords = json.loads((nats_dir / "credentials.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, PermissionError, ValueError):
        return url
    password = passwords.get(user) if isinstance(passwords, dict) else None
    if not password:
        return url
    return credentials_from_env(url, {USER_ENV: user, PASSWORD_ENV: str(password)})


class AuthorizationOwner:
    """Keeps nats-server's users in step with the runner-keys bucket: on every change,
    the configuration is written again and ``reload`` signals the server."""

    def __init__(
        self,
        render: Callable[[list[NatsUser]], str],
        config_path: Path,
        reload: Callable[[], None],
    ) -> None:
        self.render, self.config_path, self.reload = render, config_path, reload
        self.applied: list[tuple[str, str, str, str]] | None = None  # runner users written
        self.reloads = 0

    def write(self, records: Mapping[str, RunnerKeyRecord]) -> bool:
        """Write the configuration for ``records``; ``True`` when the users changed."""
        users = runner_key_users(records)
        applied: list[tuple[str, str, str, str]] = sorted(
            (r.runner_id, r.platform.os, r.platform.browser, r.nats_password_bcrypt)
            for r in records.values()
            if r.platform is not None
        )
        if applied == self.applied:
            return False
        write_private(self.config_path, self.render(users))
        self.applied = applied
        return True

    async def run(self, bus: Bus) -> None:
        """Follow the bucket until cancelled (the watch is renewed if it breaks)."""
        while True:
            try:
                async with asyncio.timeout(RECONCILE_EVERY):
                    async for records in watch_records(bus):
                        if self.write(records):
                            self.reload()
                            self.reloads += 1
                            log.info("nats.authorization_reloaded", runner_keys=len(records))
            except TimeoutError:
                continue  # renew the watch
            except Exception as err:  # NATS away: retry, never give up
                log.warning("nats.authorization_watch", error=str(err))
                await asyncio.sleep(1.0)


class EmbeddedAuthorization:
    """``tb up``'s NATS users: the configuration, the local credentials, the URL files
    for auditors and ops, and following the runner keys while the system runs."""

    def __init__(
        self,
        directory: Path,
        port: int,
        store_dir: Path,
        local_runners: int,
        *,
        host: str = "127.0.0.1",
        local_platform: tuple[str, str] = ("linux", "chromium"),
    ) -> None:
        self.directory, self.host, self.port, self.store_dir = directory, host, port, store_dir
        self.local_platform = local_platform
        self.credentials = LocalCredentials(directory, local_runners)
        self.config_path = directory / "nats-server.conf"
        self.url_files = {AUDITOR: directory / "auditor.url", OPS: directory / "ops.url"}
        self._reload: Callable[[], None] = lambda: None
        self.owner = AuthorizationOwner(self._render, self.config_path, lambda: self._reload())
        self._following: asyncio.Task[None] | None = None

    def _render(self, runner_users: list[NatsUser]) -> str:
        return render_config(
            host=self.host,
            port=self.port,
            store_dir=self.store_dir,
            server_name=f"tb-{self.port}",  # as without authorization: the same JetStream node
            users=self.credentials.users(self.local_platform) + runner_users,
        )

    def write_config(self) -> None:
        """The configuration with the local users (runner keys follow once NATS is up),
        and the auditor's and ops' URL files."""
        self.owner.applied = None
        self.owner.write({})
        for user, path in self.url_files.items():
            write_private(path, self.url(user) + "\n")

    def url(self, user: str) -> str:
        return self.credentials.url(user, self.host, self.port)

    def env(self, user: str) -> dict[str, str]:
        return self.credentials.env(user)

    def follow_runner_keys(self, bus: Bus, reload: Callable[[], None]) -> None:
        self._reload = reload
        self._following = asyncio.create_task(self.owner.run(bus), name="nats-authorization")

    async def stop_following(self) -> None:
        if self._following is not None:
            self._following.cancel()
            await asyncio.gather(self._following, return_exceptions=True)
