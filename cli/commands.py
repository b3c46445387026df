"""One coroutine per process kind: engine, api, runner, demo site."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import structlog

from cli.logs import announce, end_progress_line, progress_line
from cli.settings import (
    body_limit_from_env,
    bus_config_from_env,
    device_catalogues_from_env,
    http_policy_from_env,
    identity_config_from_env,
    logs_config_from_env,
    open_bind_warning,
    proxy_health_from_env,
    stall_margin_from_env,
    uploads_config_from_env,
)
from cli.supervise import supervise
from engine.bus import Bus, ConsumerSettingsRefused, CredentialsRefused
from schemas import subjects

log = structlog.get_logger("tb.cli")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def on_stop_signals(stop: Callable[[], object]) -> None:
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop)


async def connect_bus(url: str, name: str) -> Bus:
    from cli.reach import redacted

    shown = redacted(url)
    announce(f"[INFO] Connecting to NATS: {shown}")
    try:
        bus = await Bus.connect(url, name=name, config=bus_config_from_env())
    except CredentialsRefused as err:
        raise SystemExit(f"Authorization Violation: {err}") from None
    except Exception as err:
        raise SystemExit(f"Connection Refused: cannot reach NATS at {shown} ({err})") from None
    announce("✅ Connected to NATS")
    return bus


STOP_GRACE = 5.0  # seconds a component gets to stop before its connection is closed
SETTING_NAMES = {"ack_wait": "TB_ACK_WAIT", "max_deliver": "TB_MAX_DELIVER"}


def consumer_settings_message(err: ConsumerSettingsRefused) -> str:
    """Name the environment settings that an existing consumer refused to take."""
    changes = ", ".join(
        f"{SETTING_NAMES.get(name, name)}={new} (it keeps {old})"
        for name, (old, new) in err.settings.items()
    )
    return (
        f"{changes}: the existing consumer {err.consumer} could not be updated "
        f"({err.reason}). Remove it while no runner works (`nats consumer rm "
        f"{subjects.EVENTS_STREAM} {err.consumer}`), or set the setting back."
    )


async def run_engine(nats_url: str) -> None:
    from cli.consent_settings import consent_policy_from_env
    from engine.advisories import ExhaustedDeliveries
    from engine.consent import ConsentCommands
    from engine.consent.recheck import ConsentRecheck
    from engine.datasets.collector import DatasetCollector
    from engine.devices import DeviceCatalogues
    from engine.dispatcher import Dispatcher
    from engine.proxies.health import ProxyHealth

    policy = proxy_health_from_env()
    consent_policy = consent_policy_from_env()
    shipped = device_catalogues_from_env()
    bus = await connect_bus(nats_url, "tb-engine")
    await bus.provision()
    # a fresh system takes the newest catalogue it ships, once; later ones are only offered
    in_use = await DeviceCatalogues(bus, shipped).adopt_at_first_start()
    newest = shipped.newest()
    if newest is not None and newest.version > in_use.version:
        log.info("device_catalogue.available", in_use=in_use.version, available=newest.version)

    async def dispatcher() -> None:
        # a fresh one resumes from its snapshot and the log
        await Dispatcher(bus, stall_margin=stall_margin_from_env()).run()

    async def exhausted() -> None:
        await ExhaustedDeliveries(bus).run()

    async def proxy_health() -> None:
        await ProxyHealth(bus, policy).run()

    async def consent_recheck() -> None:
        await ConsentRecheck(ConsentCommands(bus, policy=consent_policy)).run()

    async def dataset_collection() -> None:
        # a fresh one sweeps first: what a crashed one left undone is done then
        await DatasetCollector(bus).run()

    stopping = asyncio.Event()
    components = [
        asyncio.create_task(supervise(name, run, stopping=stopping), name=name)
        for name, run in (
            ("dispatcher", dispatcher),
            ("exhausted-delivery watch", exhausted),
            ("proxy health", proxy_health),
            ("consent re-verification", consent_recheck),
            ("dataset collection", dataset_collection),
        )
    ]

    def stop() -> None:
        stopping.set()
        for task in components:
            task.cancel()

    on_stop_signals(stop)
    announce(
        "✅ Engine running (dispatcher, exhausted-delivery watch, proxy health,"
        " consent re-verification, dataset collection)"
    )
    stopped = asyncio.ensure_future(stopping.wait())
    try:
        # components end only when stopped (or on SystemExit)
        await asyncio.wait([*components, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop()
        stopped.cancel()
        _, stuck = await asyncio.wait(components, timeout=STOP_GRACE)
        # Python 3.11's wait_for can swallow a cancel (inside nats-py's fetch): such a
        # component sees it only when its connection closes, and then stops
        await bus.close()
        if stuck:
            await asyncio.wait(stuck, timeout=STOP_GRACE)


async def api_preflight(nats_url: str, *, first_admin_set: bool) -> None:
    """Before the API serves: NATS takes its credentials (a wrong password stops it here,
    not in a traceback from the app's start), and with no user yet TB_ADMIN_PASSWORD is
    set for the first admin, rather than an API nobody can log in to."""
    from api.identity import NO_ADMIN_PASSWORD
    from engine.identity.service import UserCommands

    try:
        bus = await Bus.connect(nats_url, name="tb-api-check")
    except CredentialsRefused as err:
        raise SystemExit(f"Authorization Violation: {err}") from None
    try:
        if not first_admin_set:
            await bus.provision()
            if not await UserCommands(bus).any_user():
                raise SystemExit(NO_ADMIN_PASSWORD)
    finally:
        await bus.close()


async def run_api(nats_url: str, host: str, port: int, db_path: Path) -> None:
    import uvicorn

    from api.app import create_app
    from api.services import ApiConfig
    from cli.consent_settings import consent_policy_from_env

    warning = open_bind_warning(host, port)
    if warning:
        announce(warning)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    config = ApiConfig(
        nats_url=nats_url,
        db_path=db_path,
        bus=bus_config_from_env(),
        logs=logs_config_from_env(),
        body_limit=body_limit_from_env(),
        http=http_policy_from_env(),
        identity=identity_config_from_env(),
        consent=consent_policy_from_env(),
        uploads=uploads_config_from_env(),
        device_catalogues=device_catalogues_from_env(),
    )
    await api_preflight(nats_url, first_admin_set=config.identity.admin_password is not None)
    app = create_app(config)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            log_config=None,  # its loggers write through ours (JSON, redacted)
            server_header=False,  # no server name and version for a scanner to match
            lifespan="on",
            ws="auto",
            # an open event stream never ends by itself: shutdown waits this long at most
            timeout_graceful_shutdown=5,
        )
    )
    announce(f"✅ API and dashboard on http://{host}:{port}/")
    await server.serve()
    if not server.started:  # the app's start failed (logged above): not a clean stop
        raise SystemExit(3)


async def run_runner(
    nats_url: str | None,
    *,
    api_url: str | None,
    runner_key: str | None = None,
    os_name: str | None,
    browser: str,
    slots: int | None,
    labels: dict[str, str],
    executor_kind: str,
    runner_id: str | None,
    headless: bool,
) -> int:
    """A runner until SIGINT/SIGTERM (then it drains); 2 when NATS or the API refuses its
    credentials. With ``runner_key`` it trades the key at ``api_url`` for its NATS
    credentials (and runner id) first."""
    from agents.executor import FlowExecutor, NoopExecutor
    from agents.playwright_flow import PlaywrightExecutor
    from agents.proxy_failover import ProxySecretCache
    from agents.runner import Runner
    from cli.display import display_for_headed_browser
    from cli.reach import REFUSED_PATIENCE, AuthenticationFailed, refused_for_good
    from cli.runner_credentials import KeyRefused, exchange_key
    from cli.runner_options import (
        launchable_browser_version,
        runner_capacity,
        runner_labels,
        runner_platform,
    )
    from cli.settings import drain_grace_from_env, runner_job_logs_from_env
    from engine.nats_permissions import runner_inbox
    from schemas import VERSION
    from schemas.ids import short_id

    platform = runner_platform(os_name, browser)
    labels = runner_labels(labels)
    browser_version = ""  # the no-op executor launches no browser: it serves what it is told
    if executor_kind != "noop":
        browser_version = await launchable_browser_version(platform)
        log.info("Serving", platform=f"{platform.os}/{platform.browser}", version=browser_version)
    if api_url:
        log.info("Backend (API) for this fleet", url=api_url)
    slots = runner_capacity(slots, browser=executor_kind != "noop")
    catalogues = device_catalogues_from_env()
    drain_grace = drain_grace_from_env()
    job_log_lines = runner_job_logs_from_env()
    name = runner_id or short_id("runner")
    if runner_key is not None:
        if not api_url:
            log.error("A runner key needs --api, the API to trade it at")
            return 2
        try:
            credentials = await exchange_key(api_url, runner_key, platform)
        except KeyRefused as err:
            log.error("Authentication Failed, stopping", reason=str(err))
            return 2
        nats_url, name = credentials.nats_url, credentials.runner_id
        log.info("Runner key accepted", runner_id=name)
    if nats_url is None:
        log.error("Give --nats-url, or --api with a runner key (--key or TB_RUNNER_KEY)")
        return 2
    stopping = asyncio.Event()
    current: Runner | None = None

    def stop() -> None:
        if not stopping.is_set():
            log.info("Stopping: draining", runner_id=name, grace=drain_grace)
        stopping.set()
        if current is not None:
            current.stop()

    on_stop_signals(stop)
    reaching = asyncio.ensure_future(
        _reach(nats_url, patience=REFUSED_PATIENCE if runner_key is not None else 0.0)
    )
    stopped = asyncio.ensure_future(stopping.wait())
    await asyncio.wait({reaching, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not reaching.done():
        reaching.cancel()
        await asyncio.gather(reaching, return_exceptions=True)
        log.info("Stopped before NATS was reached", runner_id=name)
        return 0
    try:
        reaching.result()
    except AuthenticationFailed as err:
        log.error("Authentication Failed, stopping", reason=str(err))
        return 2
    bus = await Bus.connect(
        nats_url, name="tb-runner", config=bus_config_from_env(), inbox_prefix=runner_inbox(name)
    )

    proxy_secrets = ProxySecretCache(bus)  # one for the runner's whole life
    revoked = asyncio.Event()

    def credentials_refused(_: object) -> None:
        if not stopping.is_set():
            log.error("Authentication Failed, stopping", reason="NATS refuses the credentials")
            revoked.set()
            stop()

    watch = asyncio.create_task(refused_for_good(bus.nc), name="credentials-watch")
    watch.add_done_callback(lambda task: None if task.cancelled() else credentials_refused(task))

    def executor() -> FlowExecutor:
        if executor_kind == "noop":
            return NoopExecutor()
        return PlaywrightExecutor(
            VERSION, headless=headless, proxy_secrets=proxy_secrets, catalogues=catalogues
        )

    async def run_once() -> None:
        nonlocal current
        # a fresh runner and browser under the same id: work it held is redelivered
        browser = executor()
        current = Runner(
            bus,
            browser,
            platform=platform,
            slots=slots,
            browser_version=browser_version,
            labels=labels,
            drain_grace=drain_grace,
            job_log_lines=job_log_lines,
        )
        current.runner_id = name
        if stopping.is_set():
            return
        async with deaf_to_stop_signals(stop):
            await browser.start()  # its driver process inherits the deafness
        await current.run()

    try:
        async with contextlib.AsyncExitStack() as stack:
            if not headless and executor_kind != "noop":
                await stack.enter_async_context(display_for_headed_browser())
            await supervise(f"runner {name}", run_once, stopping=stopping)
    finally:
        watch.cancel()
        await bus.close()
    log.info("Runner stopped", runner_id=name)
    return 2 if revoked.is_set() else 0


async def _reach(nats_url: str, *, patience: float) -> None:
    """Until NATS accepts the connection; credentials from a key exchange get
    ``patience`` seconds of refusals (a cluster node that has not reloaded yet)."""
    from cli.reach import AuthenticationFailed, until_reachable

    deadline = time.monotonic() + patience
    while True:
        try:
            return await until_reachable(nats_url)
        except AuthenticationFailed:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.5)


@contextlib.asynccontextmanager
async def deaf_to_stop_signals(stop: Callable[[], object]) -> AsyncIterator[None]:
    """Ignore SIGINT and SIGTERM while child processes start (they inherit it), then
    stop on them again: a Ctrl-C reaches the terminal's whole process group, and the
    browser's driver must outlive it while the runner drains."""
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
    try:
        yield
    finally:
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, stop)


async def run_demo_site(host: str, port: int, token_file: Path) -> None:
    from demo.site import serve_demo_site

    announce(f"✅ Demo site on http://{host}:{port}/")
    await serve_demo_site(host, port, token_file)


class ProgressBar:
    """A plain-text progress bar on stderr (no terminal tricks beyond carriage return)."""

    def __init__(self, label: str, total: int, width: int = 30) -> None:
        self.label, self.total, self.width = label, max(total, 0), width
        self._last = ""

    def update(self, done: int, total: int | None = None, suffix: str = "") -> None:
        if total is not None:
            self.total = total
        frac = min(1.0, done / self.total) if self.total else 1.0
        filled = int(frac * self.width)
        line = (
            f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] "
            f"{done}/{self.total} {suffix}"
        )
        if line != self._last:
            progress_line(line)
            self._last = line

    def finish(self) -> None:
        end_progress_line()
