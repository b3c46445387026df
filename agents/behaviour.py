"""A flow's behaviour, planned from its seed before the browser does anything.

``plan_flow(settings, seed, clicks)`` decides every random choice of a flow: its traffic
delay, session length, device profile, how the session is spread over its pages, the
scroll steps and mouse paths on each page, and which kind of link each page is left
by. It is pure: the same seed (``seed(job, flow)``, computed by the dispatcher) gives
the same plan, so a run can be reproduced. Only what the page offers is left to run
time (the links there are), and a plan names links by position (``pick``), so the
same page gives the same link.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from schemas.devices import DeviceProfile
from schemas.events import FlowDispatched
from schemas.values import JobSettings, SecondsRange, SessionDuration

PAUSE = (0.2, 1.6)  # seconds between two steps of a human visitor, before stretching
MAX_STEPS_PER_PAGE = 1000  # long pages get longer pauses instead of more steps
SCROLL_UP_SHARE = 0.15
MOVE_SHARE = 0.3  # of the steps, how many are mouse moves (the rest scroll)
MOVE_STEPS = (6, 12)  # points along one mouse path (each is a round trip to the browser)
BEND = 0.35  # how far a path's control points stray from the straight line, in its lengths
NORMAL_TRIES = 100

Point = tuple[float, float]


@dataclass(frozen=True)
class Scroll:
    dy: int  # wheel delta in CSS pixels, down when positive


@dataclass(frozen=True)
class Move:
    to: Point  # where to, as fractions of the viewport
    bend: Point  # the curve's control points, off the straight line (see ``bezier_path``)
    steps: int


@dataclass(frozen=True)
class Step:
    pause: float  # seconds after the previous step (or the page's arrival)
    action: Scroll | Move


@dataclass(frozen=True)
class Leave:
    """How a page is left: a counted click on a link, or opening a link of the page
    directly (pages beyond the clicks)."""

    click: bool
    external: bool  # a link to another consented host of the job
    pick: float  # in [0, 1): which of the candidate links (``pick_index``)
    bend: Point  # the mouse path to the link
    steps: int


@dataclass(frozen=True)
class PagePlan:
    dwell: float  # seconds on the page; the pages' dwells add up to the session
    steps: tuple[Step, ...]  # their pauses add up to at most ``dwell``
    leave: Leave | None  # None: the flow's last page


@dataclass(frozen=True)
class FlowPlan:
    delay: float  # traffic delay: seconds to wait before the first page
    session: float
    device: DeviceProfile
    pages: tuple[PagePlan, ...]
    human_surfing: bool = True


def plan_flow(settings: JobSettings, seed: int, clicks: int) -> FlowPlan:
    """Every choice of one flow, from its seed; ``clicks`` is its target's click count."""
    master = random.Random(seed)
    # one stream per aspect, drawn in a fixed order: a setting that changes the number of
    # draws in one aspect (more pages, a longer session) leaves the others as they were
    session_rng, delay_rng, device_rng, leave_rng, dwell_rng, surf_rng = (
        random.Random(master.getrandbits(64)) for _ in range(6)
    )
    session = draw_session(settings.session, session_rng)
    delay = draw_range(settings.traffic_delay, delay_rng)
    device = choose_device(settings, device_rng)
    pages = max(settings.page_traffic, clicks + 1)
    leaves = plan_leaves(pages - 1, clicks, settings.external_click_ratio, leave_rng)
    dwells = split_session(session, pages, settings.click_timing, dwell_rng)
    plans = tuple(
        PagePlan(
            dwell=dwell,
            steps=surf(dwell, surf_rng) if settings.human_surfing else (),
            leave=leaves[i] if i < len(leaves) else None,
        )
        for i, dwell in enumerate(dwells)
    )
    return FlowPlan(
        delay=delay,
        session=session,
        device=device,
        pages=plans,
        human_surfing=settings.human_surfing,
    )


def plan_for(item: FlowDispatched) -> FlowPlan:
    """A work item's plan; an item from before settings rode along has a constant
    session of its ``session_seconds``."""
    settings = item.settings or JobSettings(session_seconds=item.session_seconds)
    return plan_flow(settings, item.seed, item.clicks)


def draw_session(duration: SessionDuration, rng: random.Random) -> float:
    if duration.mode == "constant":
        return duration.seconds or 0.0
    low, high = duration.min_seconds or 0.0, duration.max_seconds or 0.0
    if duration.distribution == "uniform":
        return rng.uniform(low, high)
    mean, sd = duration.mean_seconds or 0.0, duration.stddev_seconds or 0.0
    for _ in range(NORMAL_TRIES):  # a normal cut to its bounds (the mean lies within)
        x = rng.normalvariate(mean, sd)
        if low <= x <= high:
            return x
    return mean


def draw_range(span: SecondsRange | None, rng: random.Random) -> float:
    return 0.0 if span is None else rng.uniform(span.min_seconds, span.max_seconds)


def choose_device(settings: JobSettings, rng: random.Random) -> DeviceProfile:
    """The job's first profile, or with platform switching one of them per flow."""
    if not settings.devices:
        return DeviceProfile()
    if settings.platform_switching:
        return settings.devices[rng.randrange(len(settings.devices))]
    return settings.devices[0]


def plan_leaves(transitions: int, clicks: int, ratio: float, rng: random.Random) -> list[Leave]:
    """The first ``clicks`` pages are left by a click, the rest by opening a link; of the
    clicks, ``round(clicks * ratio)`` go to another consented host, at seeded places."""
    clicks = min(clicks, transitions)
    external = set(rng.sample(range(clicks), round(clicks * ratio)))
    return [
        Leave(
            click=i < clicks,
            external=i in external,
            pick=rng.random(),
            bend=_bend(rng),
            steps=rng.randint(*MOVE_STEPS),
        )
        for i in range(transitions)
    ]


def split_session(
    session: float, pages: int, click_timing: SecondsRange | None, rng: random.Random
) -> list[float]:
    """Each page's dwell; they add up to ``session``. With a click timing, a page that is
    left stays for a time within it (all shortened alike when they would outlast the
    session) and the last page has the rest; without, shares are drawn at random."""
    if pages == 1:
        return [session]
    if click_timing is not None:
        stays = [draw_range(click_timing, rng) for _ in range(pages - 1)]
        total = sum(stays)
        if total > session:
            stays = [s * session / total for s in stays]
    else:
        weights = [rng.uniform(0.5, 1.5) for _ in range(pages)]
        stays = [session * w / sum(weights) for w in weights[:-1]]
    return [*stays, max(0.0, session - sum(stays))]


def surf(dwell: float, rng: random.Random) -> tuple[Step, ...]:
    """Scroll steps and mouse moves at random pauses through ``dwell`` seconds."""
    stretch = max(1.0, dwell / (MAX_STEPS_PER_PAGE * sum(PAUSE) / 2))
    steps: list[Step] = []
    elapsed = 0.0
    while len(steps) < MAX_STEPS_PER_PAGE:
        pause = rng.uniform(*PAUSE) * stretch
        if elapsed + pause > dwell:
            break
        elapsed += pause
        action: Scroll | Move
        if rng.random() < MOVE_SHARE:
            to = (rng.uniform(0.05, 0.95), rng.uniform(0.05, 0.95))
            action = Move(to=to, bend=_bend(rng), steps=rng.randint(*MOVE_STEPS))
        elif rng.random() < SCROLL_UP_SHARE:
            action = Scroll(dy=-rng.randint(80, 320))
        else:
            action = Scroll(dy=rng.randint(80, 640))
        steps.append(Step(pause=pause, action=action))
    return tuple(steps)


def _bend(rng: random.Random) -> Point:
    return (rng.uniform(-BEND, BEND), rng.uniform(-BEND, BEND))


def pick_index(pick: float, candidates: int) -> int:
    """The candidate a ``pick`` in [0, 1) names among ``candidates`` (> 0) links."""
    return min(int(pick * candidates), candidates - 1)


def bezier_path(start: Point, end: Point, bend: Point, steps: int) -> list[Point]:
    """``steps`` points along a cubic Bezier curve from ``start`` to ``end`` (included),
    its control points a third and two thirds along the way, pushed across the straight
    line by ``bend`` times its length; eased, so the pointer speeds up and slows down."""
    (x0, y0), (x3, y3) = start, end
    dx, dy = x3 - x0, y3 - y0
    nx, ny = -dy, dx  # across the line, as long as the line
    x1, y1 = x0 + dx / 3 + nx * bend[0], y0 + dy / 3 + ny * bend[0]
    x2, y2 = x0 + 2 * dx / 3 + nx * bend[1], y0 + 2 * dy / 3 + ny * bend[1]
    points: list[Point] = []
    for i in range(1, steps + 1):
        t = i / steps
        t = t * t * (3 - 2 * t)
        u = 1 - t
        a, b, c, d = u**3, 3 * u * u * t, 3 * u * t * t, t**3
        points.append((a * x0 + b * x1 + c * x2 + d * x3, a * y0 + b * y1 + c * y2 + d * y3))
    return points
