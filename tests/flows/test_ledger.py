"""The run ledger: durable appends, torn last lines, foreign ledgers refused, resume rows."""

from __future__ import annotations

import logging
import os
import pickle
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
from pydantic import BaseModel, ValidationError

from algorithms.datasets import epoch_order, next_batch
from flows import ledger as ledger_module
from flows.ledger import (
    CheckpointRow,
    EvaluationRow,
    ExtensionRow,
    HotloadRow,
    Ledger,
    LedgerCorruptError,
    LedgerMismatchError,
    RunEndRow,
    RunHeader,
    config_hash,
    read_ledger,
)

HEADER = RunHeader(
    run_id="reverse-demo",
    recipe="sft",
    config_hash="sha256:cfg",
    base_model="fireloop/tiny",
    tokenizer_model="/data/models/tiny",
    renderer_name=None,
    lora_rank=0,
    dataset_fingerprint="sha256:data",
)


def _checkpoint(ledger: Ledger, step: int, cursor: int, **extra: Any) -> CheckpointRow:
    return ledger.append_checkpoint(
        name=f"step-{step + 1}",
        step=step,
        data_cursor=cursor,
        epoch=0,
        state_path=f"tinker://job/state/step-{step + 1}",
        **extra,
    )


def test_rows_round_trip_through_the_file(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path / "run", HEADER)
    first = _checkpoint(ledger, step=1, cursor=8, requested_name="step-2", job_id="job-1")
    hotload = HotloadRow(identity="snap-2", deployment="dep-1", verified=True, step=2)
    evaluation = EvaluationRow(step=2, metrics={"eval/loss": 0.5})
    end = RunEndRow(next_step=2, data_cursor=8)
    for row in (hotload, evaluation, end):
        ledger.append(row)
    expected = [HEADER, first, hotload, evaluation, end]
    assert read_ledger(tmp_path / "run") == expected
    assert list(Ledger.open(tmp_path / "run", HEADER).rows) == expected
    assert first.next_step == 2 and first.base_model == HEADER.base_model


def test_appends_are_fsynced_before_they_return(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = Ledger.open(tmp_path, HEADER)
    path = tmp_path / "ledger.jsonl"
    synced: list[bytes] = []

    def recording_fsync(fd: int) -> None:
        # What the file holds when fsync is called: the row must already be written.
        synced.append(path.read_bytes())
        real_fsync(fd)

    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", recording_fsync)
    row = _checkpoint(ledger, step=0, cursor=4)
    assert synced and synced[-1].endswith(row.model_dump_json().encode() + b"\n")


def test_a_torn_last_line_is_ignored_then_set_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = Ledger.open(tmp_path, HEADER)
    kept = _checkpoint(ledger, step=0, cursor=4)
    path = tmp_path / "ledger.jsonl"
    complete = path.read_bytes()
    torn = CheckpointRow(**{**kept.model_dump(), "step": 1, "next_step": 2}).model_dump_json()
    path.write_bytes(complete + torn.encode()[:37])  # a crash mid-append
    with caplog.at_level(logging.WARNING, logger="flows.ledger"):
        assert read_ledger(tmp_path) == [HEADER, kept]
    assert "ignoring a torn last line" in caplog.text
    reopened = Ledger.open(tmp_path, HEADER)
    assert reopened.last_checkpoint() == kept
    assert path.read_bytes() == complete  # cut back to the complete rows
    (aside,) = tmp_path.glob("ledger.jsonl.torn-*")
    assert aside.read_bytes() == torn.encode()[:37]
    newer = _checkpoint(reopened, step=1, cursor=8)
    assert read_ledger(tmp_path) == [HEADER, kept, newer]


def test_a_complete_row_without_its_newline_counts_and_is_terminated(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path, HEADER)
    row = _checkpoint(ledger, step=0, cursor=4)
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(path.read_bytes().removesuffix(b"\n"))
    assert Ledger.open(tmp_path, HEADER).last_checkpoint() == row
    assert path.read_bytes().endswith(b"}\n")


def test_a_malformed_middle_line_is_an_error_naming_it(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path, HEADER)
    _checkpoint(ledger, step=0, cursor=4)
    path = tmp_path / "ledger.jsonl"
    header_line, row_line, _ = path.read_bytes().split(b"\n")
    path.write_bytes(header_line + b"\n{not json\n" + row_line + b"\n")
    with pytest.raises(LedgerCorruptError, match=r"ledger.jsonl:2: malformed ledger row"):
        Ledger.open(tmp_path, HEADER)
    path.write_bytes(row_line + b"\n")
    with pytest.raises(LedgerCorruptError, match=r":1: expected the run header"):
        Ledger.open(tmp_path, HEADER)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("config_hash", "sha256:other"),
        ("recipe", "dpo"),
        ("base_model", "fireloop/smollm2-135m"),
        ("tokenizer_model", "/elsewhere"),
        ("lora_rank", 8),
        ("dataset_fingerprint", "sha256:changed"),
        ("run_id", "another-run"),
    ],
)
def test_a_foreign_ledger_is_refused_and_untouched(
    tmp_path: Path, field: str, value: object
) -> None:
    _checkpoint(Ledger.open(tmp_path, HEADER), step=0, cursor=4)
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(path.read_bytes() + b'{"kind": "checkp')  # even a torn tail stays
    before = path.read_bytes()
    other = HEADER.model_copy(update={field: value})
    with pytest.raises(LedgerMismatchError) as caught:
        Ledger.open(tmp_path, other)
    message = str(caught.value)
    assert field in message and repr(getattr(HEADER, field)) in message and repr(value) in message
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.jsonl"]
    copy = pickle.loads(pickle.dumps(caught.value))
    assert str(copy) == message and copy.field == field


def _configured(header: RunHeader, **training: object) -> RunHeader:
    """`header` with a recorded training config (`training` over a small base)."""
    config = {"max_steps": 20, "learning_rate": 0.003, "lr_schedule": "constant", **training}
    return header.model_copy(
        update={"training_config": config, "config_hash": config_hash(_TrainingConfig(**config))}
    )


class _TrainingConfig(BaseModel):
    max_steps: int
    learning_rate: float
    lr_schedule: str


def test_a_mismatch_names_every_field_and_the_config_fields_behind_the_hash(
    tmp_path: Path,
) -> None:
    old = _configured(HEADER)
    _checkpoint(Ledger.open(tmp_path, old), step=0, cursor=4)
    other = _configured(HEADER, learning_rate=0.01).model_copy(update={"lora_rank": 8})
    with pytest.raises(LedgerMismatchError) as caught:
        Ledger.open(tmp_path, other)
    message = str(caught.value)
    assert "lora_rank is 0 in the ledger but 8 here" in message
    assert "config fields differ: learning_rate is 0.003 in the ledger but 0.01 here" in message
    assert "allow_dataset_change" not in message and "extend" not in message
    assert [d.field for d in caught.value.differences] == ["config_hash", "lora_rank"]


def test_a_ledger_without_a_recorded_config_still_opens_and_compares(tmp_path: Path) -> None:
    _checkpoint(Ledger.open(tmp_path, HEADER), step=0, cursor=4)  # an older ledger
    assert len(Ledger.open(tmp_path, _configured(HEADER).model_copy(update=_hash())).rows) == 2
    with pytest.raises(LedgerMismatchError, match="config_hash is 'sha256:cfg'"):
        Ledger.open(tmp_path, _configured(HEADER))


def _hash() -> dict[str, str]:
    return {"config_hash": HEADER.config_hash}


def test_a_ledger_that_recorded_nothing_gives_way_to_the_corrected_run(tmp_path: Path) -> None:
    Ledger.open(tmp_path, HEADER)  # an attempt that failed before its first checkpoint
    corrected = HEADER.model_copy(update={"dataset_fingerprint": "sha256:fixed"})
    ledger = Ledger.open(tmp_path, corrected)
    assert _checkpoint(ledger, step=0, cursor=1).dataset_fingerprint == "sha256:fixed"
    rows = read_ledger(tmp_path)
    assert isinstance(rows[0], RunHeader) and rows[0].dataset_fingerprint == "sha256:fixed"
    with pytest.raises(LedgerMismatchError, match="dataset_fingerprint"):
        Ledger.open(tmp_path, HEADER)  # now it recorded a checkpoint: refused


def test_extend_continues_a_run_to_more_steps_only(tmp_path: Path) -> None:
    old = _configured(HEADER)
    ledger = Ledger.open(tmp_path, old)
    _checkpoint(ledger, step=19, cursor=80)
    ledger.append(RunEndRow(next_step=20, data_cursor=80))
    longer = _configured(HEADER, max_steps=40)
    with pytest.raises(LedgerMismatchError, match=r"max_steps is 20 in the ledger but 40.*extend"):
        Ledger.open(tmp_path, longer)
    with pytest.raises(LedgerMismatchError, match="learning_rate"):
        Ledger.open(tmp_path, _configured(HEADER, max_steps=40, learning_rate=1e-2), extend=True)
    with pytest.raises(LedgerMismatchError, match="max_steps is 20 in the ledger but 10"):
        Ledger.open(tmp_path, _configured(HEADER, max_steps=10), extend=True)

    extended = Ledger.open(tmp_path, longer, extend=True)
    assert isinstance(extended.rows[-1], ExtensionRow)
    assert (extended.rows[-1].previous_max_steps, extended.rows[-1].max_steps) == (20, 40)
    assert _checkpoint(extended, step=20, cursor=84).config_hash == longer.config_hash
    again = Ledger.open(tmp_path, longer)  # the extended identity is the run's now
    assert len(again.rows) == len(extended.rows)
    with pytest.raises(LedgerMismatchError, match="max_steps is 40 in the ledger but 20"):
        Ledger.open(tmp_path, old)


def test_extend_refuses_a_decaying_schedule(tmp_path: Path) -> None:
    cosine = _configured(HEADER, lr_schedule="cosine")
    _checkpoint(Ledger.open(tmp_path, cosine), step=19, cursor=80)
    longer = _configured(HEADER, lr_schedule="cosine", max_steps=40)
    with pytest.raises(LedgerMismatchError, match="extend needs lr_schedule constant"):
        Ledger.open(tmp_path, longer, extend=True)


def test_rows_are_validated(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path, HEADER)
    with pytest.raises(ValidationError, match=r"next_step must be step \+ 1"):
        CheckpointRow(**{**_checkpoint(ledger, 0, 1).model_dump(), "next_step": 3})
    with pytest.raises(ValueError, match=r"written by Ledger\.open only"):
        ledger.append(HEADER)
    foreign = CheckpointRow(**{**_checkpoint(ledger, 1, 2).model_dump(), "lora_rank": 4})
    with pytest.raises(ValueError, match="lora_rank differs"):
        ledger.append(foreign)


def test_last_checkpoint_skips_rows_the_trainer_does_not_list(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path, HEADER)
    assert ledger.last_checkpoint() is None  # fresh start
    older = _checkpoint(ledger, step=1, cursor=8)
    newer = _checkpoint(ledger, step=3, cursor=16)
    _checkpoint(ledger, step=5, cursor=24, resumable=False, promotable=True)
    assert ledger.last_checkpoint() == newer  # promotable-only rows do not resume
    assert ledger.last_checkpoint(available={"step-2"}) == older  # the job lost step-3
    assert ledger.last_checkpoint(available=set()) is None


def test_epoch_boundary_checkpoint_resumes_with_the_next_batch(tmp_path: Path) -> None:
    """Kill right after the checkpoint at the end of epoch 0 and resume from the row."""
    seed, n_rows, batch_size, epochs = 4, 6, 3, 3
    total = n_rows * epochs
    straight: list[list[int]] = []
    cursor = 0
    while cursor < total:
        batch, cursor = next_batch(seed, cursor, batch_size, n_rows, total_rows=total)
        straight.append(batch)

    ledger = Ledger.open(tmp_path, HEADER)
    cursor = 0
    for _ in range(2):  # steps 0 and 1 consume exactly epoch 0
        _, cursor = next_batch(seed, cursor, batch_size, n_rows, total_rows=total)
    _checkpoint(ledger, step=1, cursor=cursor)
    row = Ledger.open(tmp_path, HEADER).last_checkpoint()  # the restarted flow
    assert row is not None and (row.next_step, row.data_cursor) == (2, n_rows)
    resumed: list[list[int]] = []
    cursor = row.data_cursor
    while cursor < total:
        batch, cursor = next_batch(seed, cursor, batch_size, n_rows, total_rows=total)
        resumed.append(batch)
    assert resumed[0] == epoch_order(seed, 1, n_rows)[:batch_size]  # not batch 1 again
    assert straight[: row.next_step] + resumed == straight
    assert row.next_step + len(resumed) == len(straight)  # same number of optimizer steps


@pytest.fixture
def memory_run_dir() -> Iterator[str]:
    run_dir = f"memory://runs/{uuid.uuid4().hex}"
    yield run_dir
    fs = fsspec.filesystem("memory")
    fs.rm(run_dir.removeprefix("memory://"), recursive=True)


def test_a_fsspec_url_holds_a_ledger(memory_run_dir: str) -> None:
    ledger = Ledger.open(memory_run_dir, HEADER)
    row = _checkpoint(ledger, step=0, cursor=2)
    assert read_ledger(memory_run_dir) == [HEADER, row]
    assert Ledger.open(memory_run_dir, HEADER).last_checkpoint() == row
    with fsspec.open(f"{memory_run_dir}/ledger.jsonl", "rb") as handle:
        before = handle.read()
    with pytest.raises(LedgerMismatchError, match="config_hash"):
        Ledger.open(memory_run_dir, HEADER.model_copy(update={"config_hash": "x"}))
    with fsspec.open(f"{memory_run_dir}/ledger.jsonl", "rb") as handle:
        assert handle.read() == before


def test_a_torn_tail_on_a_fsspec_filesystem_is_repaired(memory_run_dir: str) -> None:
    row = _checkpoint(Ledger.open(memory_run_dir, HEADER), step=0, cursor=2)
    url = f"{memory_run_dir}/ledger.jsonl"
    with fsspec.open(url, "rb") as handle:
        complete = handle.read()
    with fsspec.open(url, "wb") as handle:
        handle.write(complete + b'{"kind": "hotlo')
    assert Ledger.open(memory_run_dir, HEADER).last_checkpoint() == row
    with fsspec.open(url, "rb") as handle:
        assert handle.read() == complete


def test_a_header_that_never_completed_is_rewritten(tmp_path: Path) -> None:
    (tmp_path / "ledger.jsonl").write_bytes(HEADER.model_dump_json().encode()[:20])
    ledger = Ledger.open(tmp_path, HEADER)
    assert read_ledger(tmp_path) == [HEADER] == list(ledger.rows)


class _Config(BaseModel):
    learning_rate: float = 1e-4
    batch_size: int = 32


def test_config_hash_is_canonical() -> None:
    assert config_hash(_Config()) == config_hash(_Config(batch_size=32, learning_rate=1e-4))
    assert config_hash(_Config()) != config_hash(_Config(batch_size=16))
    assert config_hash(_Config()).startswith("sha256:")
    assert ledger_module.LEDGER_FILENAME == "ledger.jsonl"
