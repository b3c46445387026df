"""``tb consent``: claim a domain, verify it, list consents, re-verify or revoke one,
through the API (--api, else TB_API_URL, else the local one); credentials as every
CLI call sends them (``cli.credentials.auth_headers``)."""

from __future__ import annotations

import argparse
import os
from typing import Any
from urllib.parse import quote

from cli.http import call

DEFAULT_API = "http://127.0.0.1:8000"


def add_consent_parser(sub: Any) -> None:
    p = sub.add_parser("consent", help="claim, verify, list, recheck and revoke domain consent")
    p.add_argument("--api", default=None, help=f"the API's URL (TB_API_URL, else {DEFAULT_API})")
    consent = p.add_subparsers(dest="consent_command", required=True, metavar="CONSENT_COMMAND")

    c = consent.add_parser("claim", help="claim a domain: prints the token to publish")
    c.add_argument("domain")
    _caps_arguments(c)
    c.add_argument(
        "--include-subdomains",
        action="store_true",
        help="cover every subdomain too (granted by a DNS verification only)",
    )

    c = consent.add_parser("verify", help="look for the token and record consent (renews it)")
    c.add_argument("domain")
    how = c.add_mutually_exclusive_group()
    how.add_argument("--dns", action="store_true", help="read the TXT record _trafficbuster.DOMAIN")
    how.add_argument("--base-url", help="where the well-known file is served (scheme and port)")
    _caps_arguments(c)

    c = consent.add_parser("list", help="every claimed domain and its consent")
    c.add_argument(
        "--min-seq", type=int, default=0, help="first wait until the list shows this write"
    )

    c = consent.add_parser("recheck", help="re-verify now: a token gone revokes the consent")
    c.add_argument("domain")

    c = consent.add_parser("revoke", help="revoke: flows on the host end, its jobs pause")
    c.add_argument("domain")
    c.add_argument("--reason", default="")


def _caps_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-sessions", type=int, default=None, help="most concurrent sessions")
    p.add_argument(
        "--max-flows-per-minute", type=int, default=None, help="most flows started a minute"
    )


def _caps(args: argparse.Namespace) -> dict[str, int] | None:
    caps = {
        name: value
        for name, value in (
            ("max_concurrent", args.max_sessions),
            ("max_flows_per_minute", args.max_flows_per_minute),
        )
        if value is not None
    }
    return caps or None


async def run_consent(args: argparse.Namespace) -> int:
    api = (args.api or os.environ.get("TB_API_URL") or DEFAULT_API).rstrip("/")
    consents = f"{api}/api/v1/consents"
    command = args.consent_command
    if command == "list":
        return await _list(consents, args.min_seq)
    domain = quote(args.domain, safe="")
    body: dict[str, object] = {}
    match command:
        case "claim":
            body = {"domain": args.domain, "include_subdomains": args.include_subdomains}
            if caps := _caps(args):
                body["caps"] = caps
            status, answer = await call("POST", consents, body)
        case "verify":
            body = {"method": "dns" if args.dns else "well-known"}
            if args.base_url:
                body["base_url"] = args.base_url
            if caps := _caps(args):
                body["caps"] = caps
            status, answer = await call("POST", f"{consents}/{domain}/verify", body)
        case "recheck":
            status, answer = await call("POST", f"{consents}/{domain}/recheck")
        case _:
            status, answer = await call(
                "POST", f"{consents}/{domain}/revoke", {"reason": args.reason}
            )
    if status >= 400 or not isinstance(answer, dict):
        print(f"tb consent {command}: {_problem(status, answer)}")
        return 1
    print(_describe(command, answer))
    return 0


async def _list(consents: str, min_seq: int) -> int:
    from api.pages import MAX_LIMIT, encode_cursor

    url: str | None = f"{consents}?limit={MAX_LIMIT}&min_seq={min_seq}"
    rows: list[dict[str, Any]] = []
    while url is not None:
        status, answer = await call("GET", url)
        if status >= 400 or not isinstance(answer, list):
            print(f"tb consent list: {_problem(status, answer)}")
            return 1
        rows.extend(answer)
        last = encode_cursor(rows[-1]["domain"]) if rows else ""
        url = f"{consents}?limit={MAX_LIMIT}&cursor={last}" if len(answer) == MAX_LIMIT else None
    if not rows:
        print("no consents")
    for row in rows:
        caps = row.get("max_concurrent"), row.get("max_flows_per_minute")
        line = f"{row['domain']:40} {row['status']:9}"  # "expired" as the API says it
        if row.get("expires_at"):
            line += f" until {row['expires_at']}"
        if caps != (None, None):
            line += f"  caps {caps[0]} sessions, {caps[1]}/min"
        if row.get("include_subdomains"):
            line += "  +subdomains"
        if row.get("reason"):
            line += f"  ({row['reason']})"
        print(line)
    return 0


def _describe(command: str, answer: dict[str, Any]) -> str:
    return f"{_said(command, answer)}  (seq {answer['seq']})"


def _said(command: str, answer: dict[str, Any]) -> str:
    domain = answer.get("domain")
    match command:
        case "claim":
            return (
                f"claimed {domain}; publish this token:\n  {answer['token']}\n"
                f"at {answer['well_known_url']}\n"
                f"or as a DNS TXT record {answer['dns_record']} (tb consent verify --dns)"
            )
        case "verify":
            caps = answer["caps"]
            return (
                f"verified {domain} by {answer['method']} ({answer['evidence']}) until"
                f" {answer['expires_at']}; caps {caps['max_concurrent']} sessions,"
                f" {caps['max_flows_per_minute']} flows a minute"
                + ("; subdomains included" if answer.get("include_subdomains") else "")
            )
        case "recheck":
            why = f": {answer['reason']}" if answer.get("reason") else ""
            return f"{domain}: token {answer['found']}{why}; consent {answer['status']}"
    return f"revoked {domain}"


def _problem(status: int, answer: object) -> str:
    if isinstance(answer, dict) and "detail" in answer:
        return f"{answer['detail']} (HTTP {status})"
    return f"HTTP {status}: {answer}"
