"""Trainer activity is remembered in memory and stored at most every few seconds per job.

A busy trainer touches its job on every request; these tests check that such touches cost no
store transaction, and that the inactivity timeout still counts from the latest touch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from backend.control.jobs import (
    RUNNING,
    CreateOptions,
    JobRecord,
    TrainerJobCreate,
    TrainerJobService,
)
from backend.control.shapes import TrainingShapeCatalog
from backend.store import Store
from tests.backend.conftest import ManualClock

PENDING_S, CREATING_S, WRITE_S = 0.2, 0.3, 5.0


class CountingStore(Store):
    """A real store that counts its outermost transactions."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.transactions = 0
        self._open = 0

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self._open += 1
        if self._open == 1:
            self.transactions += 1
        try:
            with super().transaction():
                yield
        finally:
            self._open -= 1


@pytest.fixture
def store(tmp_path: Path) -> CountingStore:
    return CountingStore(tmp_path / "platform.sqlite3")


@pytest.fixture
def service(store: CountingStore, clock: ManualClock) -> TrainerJobService:
    return TrainerJobService(
        store,
        clock,
        TrainingShapeCatalog("local"),
        pending_s=PENDING_S,
        creating_s=CREATING_S,
        activity_write_s=WRITE_S,
    )


def _running_job(service: TrainerJobService, clock: ManualClock, timeout: str) -> str:
    spec = TrainerJobCreate.model_validate(
        {"trainingConfig": {"baseModel": "tiny"}, "inactivityTimeout": timeout}
    )
    service.create(spec, CreateOptions(job_id="j"))
    clock.advance(PENDING_S + CREATING_S)
    record = service.find("j")
    assert record is not None and record.state == RUNNING
    return "j"


def _stored(store: Store, job_id: str) -> JobRecord:
    record = store.documents("trainer_jobs", JobRecord).get(job_id)
    assert record is not None
    return record


def test_many_touches_within_a_second_write_once(
    service: TrainerJobService, store: CountingStore, clock: ManualClock
) -> None:
    job_id = _running_job(service, clock, "60s")
    first = clock.now
    before = store.transactions
    for _ in range(50):
        service.touch(job_id)
        clock.advance(0.02)
    assert store.transactions - before == 1
    assert _stored(store, job_id).last_activity == first
    # The in-memory activity is what the job reports, though not yet stored.
    record = service.find(job_id)
    assert record is not None and record.last_activity == pytest.approx(first + 0.98)
    # Once the write interval has passed, the next touch stores the latest activity.
    clock.advance(WRITE_S)
    service.touch(job_id)
    assert _stored(store, job_id).last_activity == clock.now


def test_the_timeout_counts_from_the_latest_unstored_touch(
    service: TrainerJobService, store: CountingStore, clock: ManualClock
) -> None:
    job_id = _running_job(service, clock, "10s")
    start = clock.now
    service.touch(job_id)  # stored
    clock.advance(3.0)
    service.touch(job_id)  # memory only
    assert _stored(store, job_id).last_activity == start
    clock.advance(9.5)  # 12.5 s after the stored touch, 9.5 s after the latest
    record = service.find(job_id)
    assert record is not None and record.state == RUNNING
    clock.advance(0.5)
    record = service.find(job_id)
    assert record is not None and record.state == "JOB_STATE_CANCELLED"
    assert record.update_time == start + 13.0  # cancelled 10 s after the latest touch
    assert _stored(store, job_id).state == "JOB_STATE_CANCELLED"


def test_a_resumed_job_starts_its_activity_afresh(
    service: TrainerJobService, store: CountingStore, clock: ManualClock
) -> None:
    job_id = _running_job(service, clock, "10s")
    service.touch(job_id)
    clock.advance(1.0)
    service.touch(job_id)  # memory only, then the job leaves RUNNING
    clock.advance(20.0)
    record = service.find(job_id)
    assert record is not None and record.state == "JOB_STATE_CANCELLED"
    service.resume(job_id)
    clock.advance(PENDING_S + CREATING_S)
    record = service.find(job_id)
    assert record is not None and record.state == RUNNING
    before = store.transactions
    service.touch(job_id)  # the first touch of the new run is stored at once
    assert store.transactions - before == 1
    assert _stored(store, job_id).last_activity == clock.now
