"""The per-model sequencer and the future store of the trainer gateway.

Pure Python: operations are closures that record the order they ran in.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from backend.trainer.errors import ServerError, UserError
from backend.trainer.futures import FutureRecord, FutureStore, TryAgain
from backend.trainer.sequencer import ModelSequencer, Operation, run_operation
from backend.trainer.wire import FailedResult, OptimStepResult, WireResult


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Ran(WireResult):
    """The result of a recorded operation: which seq id it was."""

    seq: int


class Done(WireResult):
    ok: bool = True


class Recorder:
    """Operations that append their seq id to `ran`; optional failures by seq id."""

    def __init__(self, fail: set[int] | None = None) -> None:
        self.ran: list[int] = []
        self.fail = fail or set()

    def op(self, seq: int) -> Operation:
        def operation() -> Ran:
            self.ran.append(seq)
            if seq in self.fail:
                raise UserError(f"op {seq} has a bad input")
            return Ran(seq=seq)

        return operation


def _sequencer(futures: FutureStore, clock: Clock | None = None) -> ModelSequencer:
    return ModelSequencer(
        "s-1:train:0", futures, run_operation, gap_timeout_s=60.0, clock=clock or Clock()
    )


def _result(futures: FutureStore, request_id: str) -> WireResult | TryAgain:
    return asyncio.run(futures.retrieve(request_id, hold_s=0.01))


def test_out_of_order_chunks_run_in_seq_order() -> None:
    futures, rec = FutureStore(), Recorder()
    seq = _sequencer(futures)
    # The 0.23 client sends the first chunk last.
    ids = {s: seq.submit(s, "ForwardBackward", rec.op(s)) for s in (2, 3)}
    assert rec.ran == []
    assert isinstance(_result(futures, ids[2]), TryAgain)
    ids[1] = seq.submit(1, "ForwardBackward", rec.op(1))
    assert rec.ran == [1, 2, 3]
    assert [_result(futures, ids[s]) for s in (1, 2, 3)] == [Ran(seq=1), Ran(seq=2), Ran(seq=3)]


def test_resubmitted_seq_returns_same_request_and_runs_once() -> None:
    futures, rec = FutureStore(), Recorder()
    seq = _sequencer(futures)
    first = seq.submit(1, "OptimStep", rec.op(1))
    again = seq.submit(1, "OptimStep", rec.op(1))
    assert first == again
    assert rec.ran == [1]


def test_failure_consumes_its_seq_and_the_next_runs() -> None:
    futures, rec = FutureStore(), Recorder(fail={1})
    seq = _sequencer(futures)
    bad = seq.submit(1, "ForwardBackward", rec.op(1))
    good = seq.submit(2, "OptimStep", rec.op(2))
    assert rec.ran == [1, 2]
    assert _result(futures, bad) == FailedResult(error="op 1 has a bad input", category="user")
    assert _result(futures, good) == Ran(seq=2)


def test_a_rejected_request_takes_its_turn_and_never_leaves_a_gap() -> None:
    futures, rec = FutureStore(), Recorder()
    seq = _sequencer(futures)
    later = seq.submit(3, "OptimStep", rec.op(3))  # parked behind 1 and 2
    first = seq.submit(1, "Forward", rec.op(1))
    refused = seq.reject(2, "ForwardBackward", UserError("forward_backward: bad body"))
    assert rec.ran == [1, 3] and seq.next_seq == 4
    assert _result(futures, refused) == FailedResult(
        error="forward_backward: bad body", category="user"
    )
    assert _result(futures, first) == Ran(seq=1) and _result(futures, later) == Ran(seq=3)
    assert seq.reject(2, "ForwardBackward", UserError("again")) == refused  # same future
    seq._accepted.pop(2)  # forgotten: a refusal that late is stale, as any submission
    with pytest.raises(UserError, match="stale"):
        seq.reject(2, "ForwardBackward", UserError("late"))


@pytest.mark.parametrize(("seq_id", "message"), [(0, "must be >= 1"), (1, "stale")])
def test_bad_seq_ids_are_user_errors(seq_id: int, message: str) -> None:
    futures, rec = FutureStore(), Recorder()
    seq = _sequencer(futures)
    seq.submit(1, "Forward", rec.op(1))
    seq.submit(2, "Forward", rec.op(2))
    # Forget seq 1's id so that its resubmission is stale rather than a duplicate.
    seq._accepted.pop(1)
    with pytest.raises(UserError, match=message):
        seq.submit(seq_id, "Forward", rec.op(seq_id))


def test_gap_timeout_fails_parked_operations_and_moves_on() -> None:
    clock, futures, rec = Clock(), FutureStore(), Recorder()
    seq = _sequencer(futures, clock)
    parked = [seq.submit(s, "ForwardBackward", rec.op(s)) for s in (2, 3)]
    clock.now += 30
    assert seq.expire_gaps() == 0
    clock.now += 31
    assert seq.expire_gaps() == 2
    for request_id in parked:
        payload = _result(futures, request_id)
        assert isinstance(payload, FailedResult)
        assert payload.category == "server"
        assert "seq_id 1" in payload.error
    assert rec.ran == []
    assert seq.next_seq == 4
    with pytest.raises(UserError, match="stale"):
        seq.submit(1, "ForwardBackward", rec.op(1))


def test_ops_dispatched_to_a_worker_thread_keep_order() -> None:
    futures, rec = FutureStore(), Recorder()
    worker = ThreadPoolExecutor(max_workers=1)

    def dispatch(op: Operation, record: FutureRecord) -> None:
        worker.submit(run_operation, op, record)

    seq = ModelSequencer("m", futures, dispatch)
    order = [5, 3, 4, 1, 2, 8, 7, 6]
    ids = {s: seq.submit(s, "ForwardBackward", rec.op(s)) for s in order}
    worker.shutdown(wait=True)
    assert rec.ran == sorted(order)
    assert all(_result(futures, ids[s]) == Ran(seq=s) for s in order)


def test_retrieve_waits_for_a_result_that_arrives_during_the_hold() -> None:
    futures = FutureStore()
    record = futures.new("OptimStep")

    async def scenario() -> WireResult | TryAgain:
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, record.future.set_result, OptimStepResult(metrics={}))
        return await futures.retrieve(record.request_id, hold_s=5.0)

    assert asyncio.run(scenario()) == OptimStepResult(metrics={})


def test_unknown_request_id_raises_key_error() -> None:
    with pytest.raises(KeyError):
        asyncio.run(FutureStore().retrieve("req-missing", hold_s=0.01))


def test_fail_pending_fails_only_unfinished_futures() -> None:
    futures = FutureStore()
    done, pending = futures.new("Forward"), futures.new("Forward")
    done.future.set_result(Done())
    assert futures.fail_pending(ServerError("trainer lost")) == 1
    assert _result(futures, done.request_id) == Done()
    assert _result(futures, pending.request_id) == FailedResult(
        error="trainer lost", category="server"
    )


def test_completed_results_expire_after_ttl() -> None:
    clock = Clock()
    futures = FutureStore(ttl_s=600, clock=clock)
    old = futures.new("Forward")
    old.future.set_result(Done())
    clock.now += 601
    futures.new("Forward")  # a new submission sweeps expired results
    assert futures.get(old.request_id) is None
    assert len(futures) == 1


def test_a_sweep_drops_only_the_results_past_their_ttl() -> None:
    clock = Clock()
    futures = FutureStore(ttl_s=600, clock=clock)
    old, young, pending = futures.new("Forward"), futures.new("Forward"), futures.new("Forward")
    old.future.set_result(Done())
    clock.now += 300
    young.future.set_result(Done())
    clock.now += 301  # old finished 601 s ago, young 301 s ago, pending never
    futures.new("OptimStep")
    assert futures.get(old.request_id) is None
    assert futures.get(young.request_id) is young
    assert futures.get(pending.request_id) is pending
    clock.now += 10_000
    futures.new("OptimStep")
    assert futures.get(young.request_id) is None
    assert futures.get(pending.request_id) is pending  # unfinished work never expires
