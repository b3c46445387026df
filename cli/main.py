"""``tb``: the TrafficBuster command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cli.consent import add_consent_parser
from cli.logs import configure_logging
from cli.settings import api_settings_from_env, auth_refusal

if TYPE_CHECKING:
    from engine.bus import Bus


def _port(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number 1-65535 (got {raw!r})") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 1-65535 (got {value})")
    return value


def _positive(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number (got {raw!r})") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def _count(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number (got {raw!r})") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (got {value})")
    return value


def _label(raw: str) -> tuple[str, str]:
    from schemas.labels import BadLabel, parse_label

    try:
        return parse_label(raw)
    except BadLabel as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _job_id(raw: str) -> str:
    from schemas.ids import ID_RULE, is_valid_id

    if not is_valid_id(raw):
        raise argparse.ArgumentTypeError(f"a job id {ID_RULE} (got {raw!r})")
    return raw


def _nats_url(raw: str) -> str:
    if not raw.startswith(("nats://", "tls://", "ws://", "wss://")):
        raise argparse.ArgumentTypeError(f"must be a URL like nats://127.0.0.1:4222 (got {raw!r})")
    return raw


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tb", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("up", help="start the whole system on embedded defaults, with a demo")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="API and dashboard address (beyond loopback: put TLS in front, see deploy/)",
    )
    p.add_argument("--port", type=_port, default=8000, help="API and dashboard port")
    p.add_argument("--nats-port", type=_port, default=4222)
    p.add_argument("--state-dir", type=Path, default=Path(".tb"))
    p.add_argument(
        "--runners",
        type=_count,
        default=1,
        help="local runner agents (0: wait for runners started elsewhere)",
    )
    p.add_argument("--slots", type=_positive, default=2, help="concurrent flows per runner")
    p.add_argument("--no-demo", action="store_true", help="skip the demo site and demo job")
    p.add_argument("--demo-port", type=_port, default=None, help="default: --port + 1")
    p.add_argument("--exit-when-done", action="store_true", help="stop after the demo job")
    p.add_argument(
        "--executor", choices=["playwright", "noop"], default="playwright", help=argparse.SUPPRESS
    )
    p.add_argument(
        "--headed",
        action="store_true",
        help="local runners show their browser (under Xvfb where there is no display)",
    )

    p = sub.add_parser("engine", help="run the engine (dispatcher) against a NATS server")
    p.add_argument("--nats-url", type=_nats_url, required=True)

    p = sub.add_parser("api", help="run the projector, API and dashboard")
    p.add_argument("--nats-url", type=_nats_url, required=True)
    p.add_argument(
        "--host", default="127.0.0.1", help="beyond loopback: put TLS in front, see deploy/"
    )
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--db", type=Path, default=Path(".tb/read.db"), help="SQLite read model")

    p = sub.add_parser("runner", help="run a runner agent against a NATS server")
    p.add_argument("--nats-url", type=_nats_url, default=None, help="not needed with a runner key")
    p.add_argument(
        "--api", default=None, help="the API's URL: where a runner key is traded for NATS access"
    )
    p.add_argument(
        "--key",
        dest="runner_key",
        default=None,
        help="a runner key (default: TB_RUNNER_KEY, else RUNNER_API_KEY); prefer the "
        "environment, which `ps` does not show",
    )
    p.add_argument(
        "--os",
        dest="os_name",
        choices=["linux", "windows", "macos"],
        default=None,
        help="default: RUNNER_OS, else this machine's; a runner serves only its own "
        "operating system",
    )
    p.add_argument(
        "--browser",
        choices=["chromium", "firefox", "webkit"],
        default=None,
        help="default: RUNNER_BROWSER (chrome, firefox, safari), else chromium; refused "
        "unless this machine can launch it",
    )
    p.add_argument(
        "--slots",
        type=_positive,
        default=None,
        help="concurrent flows (capacity); default: TB_RUNNER_SLOTS, else derived from "
        "this machine's free memory and cores",
    )
    p.add_argument(
        "--label",
        dest="labels",
        type=_label,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="advertised with the runner (repeatable; adds to and overrides TB_RUNNER_LABELS)",
    )
    p.add_argument("--runner-id", default=None)
    p.add_argument(
        "--headed",
        "--headful",
        dest="headed",
        action="store_true",
        help="show the browser window (under Xvfb where there is no display); HEADLESS=false too",
    )
    p.add_argument("--executor", choices=["playwright", "noop"], default="playwright")

    p = sub.add_parser("demo-site", help="serve the bundled demo site")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8001)
    p.add_argument("--token-file", type=Path, required=True)

    p = sub.add_parser("replay", help="rebuild (or --verify) the read model from the event log")
    _event_log_arguments(p)
    p.add_argument("--db", type=Path, default=None, help="default: <state-dir>/read.db")
    p.add_argument("--verify", action="store_true", help="compare instead of replacing")

    p = sub.add_parser(
        "quarantine", help="list messages readers set aside (running or stopped system)"
    )
    _event_log_arguments(p)
    p.add_argument("--after", type=_count, default=0, help="continue after this record")
    p.add_argument("--limit", type=_positive, default=100)

    p = sub.add_parser("audit", help="the audit trail, read from the event log")
    audit = p.add_subparsers(dest="audit_command", required=True, metavar="AUDIT_COMMAND")
    p = audit.add_parser("replay", help="print a job's timeline, one line per event")
    p.add_argument(
        "--job", dest="job_id", type=_job_id, required=True, metavar="ID", help="the job"
    )
    _event_log_arguments(p)

    p = sub.add_parser("dataset", help="upload and list datasets through the API")
    dataset = p.add_subparsers(dest="dataset_command", required=True, metavar="DATASET_COMMAND")
    p = dataset.add_parser("upload", help="upload a file in chunks (run again to resume)")
    p.add_argument("file", type=Path)
    p.add_argument("--kind", choices=["targets", "proxies", "devices", "settings"], required=True)
    p.add_argument("--name", default=None, help="default: the file's name")
    p.add_argument("--api", default="http://127.0.0.1:8000")
    p.add_argument("--state-dir", type=Path, default=Path(".tb"), help="remembers uploads")
    p = dataset.add_parser("list", help="the datasets you may see")
    p.add_argument("--kind", choices=["targets", "proxies", "devices", "settings"], default=None)
    p.add_argument("--api", default="http://127.0.0.1:8000")

    sub.add_parser("schema", help="print the JSON Schema of every event")
    add_consent_parser(sub)
    return parser


def _event_log_arguments(p: argparse.ArgumentParser) -> None:
    """Where the event log is, for commands that read it (running or stopped system)."""
    p.add_argument("--state-dir", type=Path, default=Path(".tb"))
    p.add_argument("--nats-port", type=_port, default=4222)
    p.add_argument("--nats-url", type=_nats_url, default=None, help="overrides --nats-port")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command in ("up", "api") and (refusal := auth_refusal()):
        print(f"tb {args.command}: error: {refusal}", file=sys.stderr)
        sys.exit(2)
    configure_logging()
    if args.command in ("up", "api"):
        api_settings_from_env()  # a bad or placeholder setting stops here, not in a child
    try:
        code = asyncio.run(_dispatch(args))
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


async def _dispatch(args: argparse.Namespace) -> int:
    from cli import commands

    match args.command:
        case "up":
            from cli.up import UpOptions, up

            if args.headed:
                os.environ["HEADLESS"] = "false"  # the runners it starts inherit it

            return await up(
                UpOptions(
                    host=args.host,
                    port=args.port,
                    nats_port=args.nats_port,
                    state_dir=args.state_dir,
                    runners=args.runners,
                    slots=args.slots,
                    demo=not args.no_demo,
                    demo_port=args.demo_port,
                    exit_when_done=args.exit_when_done,
                    executor=args.executor,
                )
            )
        case "engine":
            from cli.nats_auth import credentials_from_env

            await commands.run_engine(credentials_from_env(args.nats_url))
        case "api":
            from cli.nats_auth import credentials_from_env

            nats_url = credentials_from_env(args.nats_url)
            await commands.run_api(nats_url, args.host, args.port, args.db)
        case "runner":
            from cli.nats_auth import credentials_from_env
            from cli.runner_credentials import runner_key_from_env
            from cli.settings import (
                headless_from_env,
                runner_browser_from_env,
                runner_os_from_env,
            )

            return await commands.run_runner(
                args.nats_url and credentials_from_env(args.nats_url),
                api_url=args.api,
                runner_key=args.runner_key or runner_key_from_env(),
                os_name=args.os_name or runner_os_from_env(),
                browser=args.browser or runner_browser_from_env() or "chromium",
                slots=args.slots,
                labels=dict(args.labels),
                executor_kind=args.executor,
                runner_id=args.runner_id,
                headless=headless_from_env() and not args.headed,
            )
        case "dataset":
            from cli import datasets

            if args.dataset_command == "upload":
                return await asyncio.to_thread(
                    datasets.run_upload, args.api, args.file, args.kind, args.name, args.state_dir
                )
            return await asyncio.to_thread(datasets.run_list, args.api, args.kind)
        case "demo-site":
            await commands.run_demo_site(args.host, args.port, args.token_file)
        case "replay":
            from cli.replay import rebuild_read_model, verify_read_model

            db = args.db or args.state_dir / "read.db"
            if args.verify:
                return await _on_event_log(args, "replay", lambda bus: verify_read_model(bus, db))
            return await _on_event_log(args, "replay", lambda bus: rebuild_read_model(bus, db))
        case "quarantine":
            from cli.quarantine import show_quarantined

            return await _on_event_log(
                args,
                "quarantine",
                lambda bus: show_quarantined(bus, after=args.after, limit=args.limit),
            )
        case "audit":
            from cli.audit import replay_job

            return await _on_event_log(args, "audit", lambda bus: replay_job(bus, args.job_id))
        case "consent":
            from cli.consent import run_consent

            return await run_consent(args)
        case "schema":
            from schemas.events import event_schema

            print(json.dumps(event_schema(), indent=2))
    return 0


async def _on_event_log(
    args: argparse.Namespace, command: str, action: Callable[[Bus], Awaitable[int]]
) -> int:
    """Run ``action`` on the event log of --state-dir: the running system's, or the
    stopped system's store served for the occasion."""
    from cli.event_store import Unreachable, event_store
    from cli.state_dir import StateDir

    try:
        async with event_store(
            StateDir(args.state_dir),
            nats_url=args.nats_url,
            nats_port=args.nats_port,
            name=f"tb-{command}",
        ) as bus:
            return await action(bus)
    except Unreachable as err:
        print(f"tb {command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    main()
