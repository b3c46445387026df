"""A small shop-like site to run flows against, which publishes its own consent token.

Every page has the same nav bar of internal links, enough text to scroll, and a
footer link to https://example.org/ so a flow shows the guard recording a
``ClickSkipped``; ``/redirect-out`` shows a redirect off-site being refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from html import escape
from pathlib import Path

import uvicorn
from litestar import Litestar, MediaType, get
from litestar.exceptions import NotFoundException
from litestar.params import FromPath
from litestar.response import Redirect

EXTERNAL_URL = "https://example.org/"
NAV = (("/", "Home"), ("/products", "Products"), ("/about", "About"), ("/contact", "Contact"))
PRODUCTS = {
    1: ("Trail Runner", "49.00", "A light running shoe with a grippy sole for wet paths."),
    2: ("City Backpack", "79.00", "Twenty litres, a padded laptop sleeve and a rain cover."),
    3: ("Thermal Bottle", "24.50", "Keeps coffee hot for twelve hours and water cold for a day."),
    4: ("Rain Shell", "129.00", "A packable waterproof jacket with taped seams and a hood."),
    5: ("Wool Socks", "15.00", "Merino blend, cushioned heel, three pairs to a pack."),
}
FILLER = (
    "We started this shop to sell the gear we use every day, and nothing we would not carry"
    " ourselves. Every item is tested on real trails and real commutes before it is listed.",
    "Orders placed before two in the afternoon leave our warehouse the same day. Returns are"
    " free for thirty days, and we answer every message within one working day.",
    "Our packaging is recycled cardboard and paper tape. We publish the repair manuals for"
    " everything we make, and we keep spare parts in stock for at least five years.",
)


def render(title: str, body: str) -> str:
    nav = " | ".join(f'<a href="{href}">{label}</a>' for href, label in NAV)
    filler = "".join(f"<p>{text}</p>" for text in FILLER * 3)
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{escape(title)} · TrafficBuster demo shop</title>"
        "<style>body{font-family:sans-serif;max-width:46rem;margin:auto;padding:1rem}"
        "nav,footer{padding:.5rem 0;border-bottom:1px solid #ccc}footer{border-top:1px solid"
        " #ccc;border-bottom:0;margin-top:2rem}</style></head>"
        f"<body><nav>{nav}</nav><main><h1>{escape(title)}</h1>{body}{filler}</main>"
        f'<footer>Made with care. Our partner: <a href="{EXTERNAL_URL}">example.org</a></footer>'
        "</body></html>"
    )


def product_link(product_id: int) -> str:
    name, price, _ = PRODUCTS[product_id]
    return f'<li><a href="/products/{product_id}">{escape(name)}</a> — €{price}</li>'


@get("/", media_type=MediaType.HTML)
async def home() -> str:
    featured = "".join(product_link(i) for i in (1, 3, 4))
    return render("Gear for every day", f"<p>This week's favourites:</p><ul>{featured}</ul>")


@get("/products", media_type=MediaType.HTML)
async def products() -> str:
    return render("Products", f"<ul>{''.join(product_link(i) for i in PRODUCTS)}</ul>")


@get("/products/{product_id:int}", media_type=MediaType.HTML)
async def product(product_id: FromPath[int]) -> str:
    if product_id not in PRODUCTS:
        raise NotFoundException(f"product {product_id} does not exist")
    name, price, blurb = PRODUCTS[product_id]
    others = "".join(product_link(i) for i in PRODUCTS if i != product_id)
    body = (
        f"<p><strong>€{price}</strong></p><p>{escape(blurb)}</p><h2>See also</h2><ul>{others}</ul>"
    )
    return render(name, body)


@get("/about", media_type=MediaType.HTML)
async def about() -> str:
    body = (
        "<p>A small team in a small workshop.</p>"
        '<p><a href="/redirect-out">Visit our partner</a> (a redirect to another site).</p>'
    )
    return render("About us", body)


@get("/contact", media_type=MediaType.HTML)
async def contact() -> str:
    return render("Contact", "<p>Write to shop@demo.invalid or call +00 0000 0000.</p>")


@get("/redirect-out")
async def redirect_out() -> Redirect:
    return Redirect(EXTERNAL_URL, status_code=302)


@get("/healthz", media_type=MediaType.TEXT)
async def healthz() -> str:
    return "ok"


def build_demo_app(token_file: Path) -> Litestar:
    """The demo site; its consent token is read from ``token_file`` on every request."""

    @get("/.well-known/trafficbuster.txt", media_type=MediaType.TEXT, sync_to_thread=True)
    def consent_token() -> str:
        try:
            return token_file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise NotFoundException("no consent token published") from None

    handlers = [home, products, product, about, contact, redirect_out, healthz, consent_token]
    return Litestar(route_handlers=handlers, openapi_config=None)


class DemoSiteFailed(Exception):
    """The demo site could not start (typically: the port is taken)."""


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves SIGINT/SIGTERM to the process embedding it, and
    sets ``ready`` once it listens."""

    def __init__(self, config: uvicorn.Config, ready: asyncio.Event | None = None) -> None:
        super().__init__(config)
        self.ready = ready

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.ready is not None:
            self.ready.set()


async def serve_demo_site(
    host: str, port: int, token_file: Path, ready: asyncio.Event | None = None
) -> None:
    """Serve the demo site until cancelled (``ready`` is set once it listens); shuts down
    gracefully, then re-raises."""
    config = uvicorn.Config(
        build_demo_app(token_file), host=host, port=port, log_level="warning", lifespan="on"
    )
    server = EmbeddedServer(config, ready)
    serving = asyncio.ensure_future(_serve(server, f"{host}:{port}"))
    try:
        await asyncio.shield(serving)
    except asyncio.CancelledError:
        server.should_exit = True
        await serving
        raise


async def _serve(server: uvicorn.Server, address: str) -> None:
    try:
        await server.serve()
    except SystemExit as exc:  # uvicorn exits the process when it cannot bind
        raise DemoSiteFailed(f"demo site could not start on {address}") from exc
