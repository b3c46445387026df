"""A flow's planned behaviour carried out on its page: scroll steps with the mouse
wheel, mouse moves along curved paths, the dwell; and a trail of what was done.

Every planned step is carried out, even when the browser is slow and the step's time
has passed (it then follows at once): the recorded sequence is the plan's, whatever
the machine's load, so the same seed shows the same sequence.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from playwright.async_api import Locator, Page

from agents.behaviour import Leave, Move, PagePlan, Point, Scroll, bezier_path
from schemas.devices import Viewport

POINT_TIMEOUT_MS = 5_000


@dataclass
class PageTrail:
    """What a flow did on one page, for its ``PageLeft`` event."""

    dwell_ms: int = 0
    scrolls: list[int] = field(default_factory=list)
    pauses_ms: list[int] = field(default_factory=list)
    moves: list[tuple[int, int]] = field(default_factory=list)


async def sleep_until(deadline: float) -> None:
    left = deadline - asyncio.get_running_loop().time()
    if left > 0:
        await asyncio.sleep(left)


class Surfer:
    """Moves one page's mouse and wheel; remembers where the pointer is."""

    def __init__(self, page: Page, viewport: Viewport) -> None:
        self.page, self.viewport = page, viewport
        self.pointer: Point = (viewport.width / 2, viewport.height / 2)

    async def browse(self, plan: PagePlan, arrived: float, trail: PageTrail) -> None:
        """Carry out ``plan``'s steps at their times from ``arrived`` (loop time), then
        stay until its dwell is over."""
        at = arrived
        for step in plan.steps:
            at += step.pause
            await sleep_until(at)
            trail.pauses_ms.append(round(step.pause * 1000))
            match step.action:
                case Scroll(dy=dy):
                    await self.page.mouse.wheel(0, dy)
                    trail.scrolls.append(dy)
                case Move(to=(fx, fy), bend=bend, steps=steps):
                    end = (fx * self.viewport.width, fy * self.viewport.height)
                    await self.glide(end, bend, steps)
                    trail.moves.append((round(end[0]), round(end[1])))
        await sleep_until(arrived + plan.dwell)

    async def point_at(self, link: Locator, leave: Leave) -> None:
        """Bring the pointer to the middle of ``link`` along the planned curve (before the
        click, which lands there). Not in the trail: where the link is depends on how far
        the page has scrolled, which the wheel does not wait for."""
        await link.scroll_into_view_if_needed(timeout=POINT_TIMEOUT_MS)
        box = await link.bounding_box()
        if box is None:
            return
        end = (box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        await self.glide(end, leave.bend, leave.steps)

    async def glide(self, end: Point, bend: Point, steps: int) -> None:
        for x, y in bezier_path(self.pointer, end, bend, steps):
            await self.page.mouse.move(x, y)
        self.pointer = end
