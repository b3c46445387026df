"""The device catalogue decider: versions only move forward, a fresh system adopts once,
an update takes only a newer version; and which catalogue a job records and is checked
against."""

from __future__ import annotations

from contextlib import suppress
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.devices.decider import AdoptCatalogue, InUse, Meta, decide, evolve, fold
from engine.errors import Conflict, Rejected
from engine.jobs.decider import CreateJob, Job
from engine.jobs.decider import Meta as JobMeta
from engine.jobs.decider import decide as decide_job
from schemas import subjects
from schemas.device_catalogue import CatalogueVersion, ShippedCatalogues
from schemas.devices import DeviceProfile
from schemas.events import DeviceCatalogueAdopted, JobCreated, encode_event
from schemas.stored import Undecodable, decode_stored
from schemas.values import JobSettings, Platform, Target

T0 = datetime(2026, 1, 1, tzinfo=UTC)
META = Meta(id="e", at=T0, actor="admin")


def sha(version: int) -> str:
    return f"{version:064x}"


def offer(version: int, first_start: bool = False) -> AdoptCatalogue:
    return AdoptCatalogue(version, sha(version), f"playwright {version}", first_start)


def run(state: InUse, cmd: AdoptCatalogue, seq: int) -> tuple[InUse, list[DeviceCatalogueAdopted]]:
    events = decide(state, cmd, META)
    for event in events:
        state = evolve(state, event, seq)
    return state, events


def test_a_fresh_system_adopts_the_newest_shipped_once() -> None:
    state, events = run(InUse(), offer(1, first_start=True), 1)
    assert [(e.version, e.previous) for e in events] == [(1, 0)]
    assert (state.version, state.seq, state.adopted_by) == (1, 1, "admin")
    # a later start with a newer package only offers its version
    assert decide(state, offer(2, first_start=True), META) == []


def test_an_update_takes_only_a_newer_version() -> None:
    state, _ = run(InUse(), offer(1, first_start=True), 1)
    state, events = run(state, offer(3), 5)
    assert [(e.version, e.previous) for e in events] == [(3, 1)]
    for older in (1, 2, 3):
        with pytest.raises(Conflict, match="nothing newer to take: version 3 is in use"):
            decide(state, offer(older), META)


def test_the_same_version_with_other_content_is_named() -> None:
    state, _ = run(InUse(), offer(2, first_start=True), 1)
    other = AdoptCatalogue(2, "f" * 64, "elsewhere")
    with pytest.raises(Conflict, match="other content"):
        decide(state, other, META)


def test_an_adoption_is_stored_on_its_own_subject_and_nowhere_else() -> None:
    (event,) = decide(InUse(), offer(1, first_start=True), META)
    subject = subjects.subject_for(event)
    assert subject == "tb.catalogue.devices.DeviceCatalogueAdopted"
    assert subjects.DEVICE_CATALOGUE == "tb.catalogue.devices.*"
    assert decode_stored(subject, encode_event(event), None) == event
    with pytest.raises(Undecodable, match="belongs on"):
        decode_stored("tb.job.job_1.DeviceCatalogueAdopted", encode_event(event), None)
    assert subjects.device_catalogue_msg_id(1) != subjects.device_catalogue_msg_id(2)


def test_an_adoption_not_newer_changes_nothing_when_folded() -> None:
    newer = DeviceCatalogueAdopted(id="a", at=T0, actor="x", version=2, sha256=sha(2), source="s")
    older = DeviceCatalogueAdopted(id="b", at=T0, actor="y", version=1, sha256=sha(1), source="s")
    state = fold([(3, newer), (7, older)])
    assert (state.version, state.adopted_by, state.seq) == (2, "x", 7)


@given(st.lists(st.tuples(st.integers(1, 6), st.booleans()), max_size=20))
def test_versions_never_go_back_and_a_fresh_system_adopts_once(
    cmds: list[tuple[int, bool]],
) -> None:
    state, log = InUse(), []
    for seq, (version, first_start) in enumerate(cmds, start=1):
        before = state
        with suppress(Conflict):
            state, events = run(state, offer(version, first_start), seq)
            log.extend(events)
            if first_start:
                assert bool(events) == (before.version == 0)
            else:
                assert version > before.version
        assert state.version >= before.version
    assert [e.previous for e in log] == [0, *(e.version for e in log)][: len(log)]
    assert [e.version for e in log] == sorted({e.version for e in log})


# -- jobs: the version recorded, names checked against it ------------------------------

TARGETS = (Target(url="http://a.test/", flows=1),)
JOB_META = JobMeta(id="j", at=T0, actor="u")


def create(settings: JobSettings, platform: Platform = Platform()) -> list[object]:
    catalogue = ShippedCatalogues().get(1)
    assert catalogue is not None
    cmd = CreateJob("job_1", "j", TARGETS, settings, platform, catalogue=catalogue)
    return list(decide_job(Job(), cmd, JOB_META))


def test_a_job_records_the_catalogue_it_was_checked_against() -> None:
    (created,) = create(JobSettings(devices=(DeviceProfile(name="iPhone 13"),)))
    catalogue = ShippedCatalogues().get(1)
    assert isinstance(created, JobCreated) and catalogue is not None
    assert created.device_catalogue == catalogue.ref
    with pytest.raises(Rejected, match="device catalogue version 1") as refused:
        create(JobSettings(devices=(DeviceProfile(name="Nokia 3310"),)))
    assert refused.value.field == "settings.devices[0].name"


def test_without_the_catalogue_only_default_is_taken() -> None:
    ref = CatalogueVersion(version=9, sha256=sha(9))
    named = JobSettings(devices=(DeviceProfile(name="iPhone 13"),))
    cmd = CreateJob("job_1", "j", TARGETS, named, Platform(), device_catalogue=ref)
    with pytest.raises(Rejected, match=r"catalogue in use \(version 9\) is not shipped"):
        decide_job(Job(), cmd, JOB_META)
    plain = CreateJob("job_1", "j", TARGETS, JobSettings(), Platform(), device_catalogue=ref)
    (created,) = decide_job(Job(), plain, JOB_META)
    assert isinstance(created, JobCreated) and created.device_catalogue == ref


@pytest.mark.parametrize(
    ("profile", "platform", "refused"),
    [
        (DeviceProfile(name="Desktop Firefox"), Platform(), None),  # presented in chromium
        (DeviceProfile(name="iPhone 13", os="ios"), Platform(), None),  # ios: always presented
        (DeviceProfile(browser="firefox"), Platform(), "settings.devices[0].browser"),
        (DeviceProfile(browser="firefox"), Platform(browser="firefox"), None),
        (DeviceProfile(os="windows"), Platform(), "settings.devices[0].os"),
        (DeviceProfile(os="windows"), Platform(os="windows"), None),
    ],
)
def test_a_family_a_profile_names_is_where_it_must_run(
    profile: DeviceProfile, platform: Platform, refused: str | None
) -> None:
    settings = JobSettings(devices=(profile,))
    if refused is None:
        assert create(settings, platform)
        return
    with pytest.raises(Rejected) as err:
        create(settings, platform)
    assert err.value.field == refused and "job's platform" in err.value.rule
