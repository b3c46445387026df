"""The behaviour planner: seeded, bounded, and different from flow to flow."""

from __future__ import annotations

import math

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.behaviour import Move, Scroll, bezier_path, pick_index, plan_flow
from engine.dispatch.state import flow_seed
from engine.jobs.decider import Job
from schemas.devices import DeviceProfile
from schemas.values import JobSettings, SecondsRange, SessionDuration

seconds = st.floats(min_value=0, max_value=600, allow_nan=False)
seeds = st.integers(min_value=0, max_value=2**63 - 1)


@st.composite
def spans(draw: st.DrawFn) -> SecondsRange:
    a, b = sorted((draw(seconds), draw(seconds)))
    return SecondsRange(min_seconds=a, max_seconds=b)


@st.composite
def durations(draw: st.DrawFn) -> SessionDuration:
    kind = draw(st.sampled_from(["constant", "uniform", "normal"]))
    if kind == "constant":
        return SessionDuration(seconds=draw(seconds))
    span = draw(spans())
    if kind == "uniform":
        return SessionDuration(
            mode="variable", min_seconds=span.min_seconds, max_seconds=span.max_seconds
        )
    mean = draw(st.floats(min_value=span.min_seconds, max_value=span.max_seconds))
    return SessionDuration(
        mode="variable",
        distribution="normal",
        min_seconds=span.min_seconds,
        max_seconds=span.max_seconds,
        mean_seconds=mean,
        stddev_seconds=draw(st.floats(min_value=0, max_value=300)),
    )


@st.composite
def job_settings(draw: st.DrawFn) -> JobSettings:
    names = ["default", "iPhone 13", "Pixel 7", "Desktop Chrome", "iPad Mini"]
    devices = tuple(
        DeviceProfile(name=n) for n in draw(st.lists(st.sampled_from(names), max_size=4))
    )
    return JobSettings(
        session_duration=draw(durations()),
        page_traffic=draw(st.integers(min_value=1, max_value=8)),
        traffic_delay=draw(st.none() | spans()),
        human_surfing=draw(st.booleans()),
        click_timing=draw(st.none() | spans()),
        external_click_ratio=draw(st.floats(min_value=0, max_value=1)),
        devices=devices,
        platform_switching=draw(st.booleans()),
    )


clicks_per_flow = st.integers(min_value=0, max_value=10)


@settings(max_examples=200, deadline=None)
@given(job_settings(), seeds, clicks_per_flow)
def test_same_seed_same_plan(job: JobSettings, seed: int, clicks: int) -> None:
    assert plan_flow(job, seed, clicks) == plan_flow(job, seed, clicks)


@settings(max_examples=300, deadline=None)
@given(job_settings(), seeds, clicks_per_flow)
def test_plan_keeps_to_its_settings(job: JobSettings, seed: int, clicks: int) -> None:
    plan = plan_flow(job, seed, clicks)
    session = job.session
    if session.mode == "constant":
        assert plan.session == session.seconds
    else:
        assert session.min_seconds is not None and session.max_seconds is not None
        assert session.min_seconds <= plan.session <= session.max_seconds
    if job.traffic_delay is None:
        assert plan.delay == 0
    else:
        assert job.traffic_delay.min_seconds <= plan.delay <= job.traffic_delay.max_seconds
    assert plan.device in (job.devices or (DeviceProfile(),))
    if not job.platform_switching and job.devices:
        assert plan.device == job.devices[0]

    assert len(plan.pages) == max(job.page_traffic, clicks + 1)
    assert math.isclose(sum(p.dwell for p in plan.pages), plan.session, abs_tol=1e-6)
    for page in plan.pages:
        assert page.dwell >= 0
        assert sum(s.pause for s in page.steps) <= page.dwell + 1e-9
        assert job.human_surfing or page.steps == ()
        for step in page.steps:
            if isinstance(step.action, Move):
                assert all(0 <= f <= 1 for f in step.action.to)
    timing = job.click_timing
    stays = [p.dwell for p in plan.pages[:-1]]
    if timing is not None and sum(stays) < plan.session - 1e-6:  # not shortened to fit
        assert all(timing.min_seconds - 1e-9 <= s <= timing.max_seconds + 1e-9 for s in stays)

    leaves = [p.leave for p in plan.pages]
    assert leaves[-1] is None and None not in leaves[:-1]
    clicked = [leave for leave in leaves if leave is not None and leave.click]
    assert len(clicked) == clicks
    external = sum(leave.external for leave in clicked)
    assert abs(external - clicks * job.external_click_ratio) <= 0.5
    assert not any(leave.external for leave in leaves if leave is not None and not leave.click)
    assert all(0 <= leave.pick < 1 for leave in leaves if leave is not None)


def test_different_flows_of_a_job_plan_differently() -> None:
    job = Job(
        job_id="job-1",
        settings=JobSettings(
            session_duration=SessionDuration(mode="variable", min_seconds=10, max_seconds=60),
            page_traffic=3,
        ),
    )
    plans = [plan_flow(job.settings, flow_seed(job, f"job-1_0_{n}"), 2) for n in range(20)]
    assert len({p.session for p in plans}) == 20
    assert len({p.pages[0].steps for p in plans}) == 20
    assert len({tuple(p.pages[i].leave for i in range(2)) for p in plans}) == 20
    # the job's seed, when set, decides them: another job with that seed replays them
    seeded = msgspec.structs.replace(job.settings, seed=42)
    again = Job(job_id="job-2", settings=seeded)
    first = Job(job_id="job-1", settings=seeded)
    assert flow_seed(again, "job-2_0_3") == flow_seed(first, "job-1_0_3")
    assert flow_seed(again, "job-2_0_3") != flow_seed(first, "job-1_0_4")
    # without it, the job's id does
    assert flow_seed(Job(job_id="job-2"), "job-2_0_3") != flow_seed(job, "job-1_0_3")


@settings(max_examples=100, deadline=None)
@given(seeds)
def test_platform_switching_uses_every_profile(seed: int) -> None:
    devices = tuple(DeviceProfile(name=n) for n in ("iPhone 13", "Pixel 7", "Desktop Chrome"))
    job = JobSettings(devices=devices, platform_switching=True)
    chosen = {plan_flow(job, seed + n, 0).device.name for n in range(60)}
    assert chosen == {d.name for d in devices}


def test_long_sessions_keep_the_step_count_bounded() -> None:
    job = JobSettings(session_duration=SessionDuration(seconds=3600))
    (page,) = plan_flow(job, 1, 0).pages
    assert 100 < len(page.steps) <= 1000
    scrolls = [s.action.dy for s in page.steps if isinstance(s.action, Scroll)]
    assert sum(dy > 0 for dy in scrolls) > sum(dy < 0 for dy in scrolls)  # mostly down


@given(
    st.tuples(seconds, seconds),
    st.tuples(seconds, seconds),
    st.tuples(st.floats(-0.35, 0.35), st.floats(-0.35, 0.35)),
    st.integers(1, 40),
)
def test_mouse_path_ends_where_it_should(
    start: tuple[float, float],
    end: tuple[float, float],
    bend: tuple[float, float],
    steps: int,
) -> None:
    path = bezier_path(start, end, bend, steps)
    assert len(path) == steps
    assert math.isclose(path[-1][0], end[0], abs_tol=1e-6)
    assert math.isclose(path[-1][1], end[1], abs_tol=1e-6)


def test_mouse_path_is_curved() -> None:
    path = bezier_path((0, 0), (300, 0), (0.3, 0.2), 20)
    assert max(abs(y) for _, y in path) > 20  # off the straight line
    assert path == sorted(path)  # and still going forward


@given(st.floats(min_value=0, max_value=1, exclude_max=True), st.integers(1, 500))
def test_pick_names_a_candidate(pick: float, candidates: int) -> None:
    assert 0 <= pick_index(pick, candidates) < candidates
