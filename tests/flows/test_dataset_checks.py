"""Bad input is refused before any compute, named by file and line or by config field.

`CASES` is the table: each bad input (a dataset file, a config field) with the error it must
raise. The data cases run `load_sft_data` on the embedded platform's tiny model, whose tokenizer
is known before provisioning, so every row is rendered and measured at load time. Two flow
tests show where the check sits in a run: before the run directory exists when the tokenizer is
known, after provisioning but before any optimizer step when only the trainer can name it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from algorithms.datasets import DatasetError
from backend import LocalPlatform
from fireloop.overrides import apply_overrides
from flows.config import SFTConfig
from flows.embedded import local_model_facts
from flows.ledger import CheckpointRow, read_ledger
from flows.notices import NOTICE_LOGGER
from flows.sft import run_sft
from flows.sft_data import load_sft_data
from sdk import ConfigError
from tests.flows.conftest import sft_config


def _row(user: str = "ab=", assistant: str = "ba") -> str:
    return json.dumps(
        {
            "messages": [
                {"role": "user", "content": user},
                {"role": "assistant", "content": assistant},
            ]
        }
    )


GOOD = _row()
TOO_LONG = _row("x" * 300, "y")  # 300+ byte tokens: over the tiny model's 256-token context
DEEP = '{"messages": ' + "[" * 200_000 + "]" * 200_000 + "}"
HUGE_LINE = _row("x" * (1 << 20) + "y" * 512)  # just over the 1 MiB default line limit


@dataclass(frozen=True)
class Case:
    """One bad input: dataset lines (None: the dataset named in `fields`), config fields (as
    `--set` would give them), and the error with a pattern its message must match."""

    name: str
    lines: list[str] | None
    fields: dict[str, Any]
    error: type[Exception]
    match: str


CASES = [
    # -- rows against the model, at load time, named by file and line --
    Case(
        "row over the context",
        [GOOD, GOOD, TOO_LONG, GOOD],
        {},
        DatasetError,
        r"data\.jsonl:3: messages: 30\d tokens, more than the model's context of 256",
    ),
    Case(
        "max_seq_len over the context",
        [GOOD],
        {"max_seq_len": 1000},
        ConfigError,
        r"max_seq_len 1000 is larger than the model's context \(256\)",
    ),
    Case(
        "lora_rank over the hidden size",
        [GOOD],
        {"lora_rank": 100},
        ConfigError,
        r"lora_rank 100 is larger than fireloop/tiny allows \(64, its narrowest adapted layer\)",
    ),
    # -- the file itself --
    Case(
        "line over the line limit",
        [GOOD, HUGE_LINE, GOOD],
        {},
        DatasetError,
        r"data\.jsonl:2: \(line\): line longer than max_line_bytes \(1048576 bytes\)",
    ),
    Case(
        "line over a configured line limit",
        [GOOD, _row("x" * 200)],
        {"max_line_bytes": 100},
        DatasetError,
        r"data\.jsonl:2: \(line\): line longer than max_line_bytes \(100 bytes\)",
    ),
    Case(
        "deep JSON nesting",
        [GOOD, DEEP],
        {},
        DatasetError,
        r"data\.jsonl:2: \(line\): JSON nested too deeply",
    ),
    Case("a directory", None, {"dataset": "."}, DatasetError, r"a directory, not a chat JSONL"),
    Case("empty dataset value", None, {"dataset": ""}, ValidationError, r"dataset is empty"),
    Case("blank eval_dataset", [GOOD], {"eval_dataset": " "}, ValidationError, r"is empty"),
    # -- numbers the config refuses, naming the field --
    Case("infinite learning rate", [GOOD], {"learning_rate": "Infinity"}, ValidationError,
         r"learning_rate\n.*finite number"),
    Case("NaN learning rate", [GOOD], {"learning_rate": "NaN"}, ValidationError,
         r"learning_rate\n.*finite number"),
    Case("absurd learning rate", [GOOD], {"learning_rate": "50"}, ValidationError,
         r"learning_rate\n.*less than or equal to 1"),
    Case("infinite weight decay", [GOOD], {"adam.weight_decay": "Infinity"}, ValidationError,
         r"adam\n.*weight_decay must be a finite number"),
    Case("NaN weight decay", [GOOD], {"adam.weight_decay": "NaN"}, ValidationError,
         r"adam\.weight_decay\n.*greater than or equal to 0"),
    Case("infinite retry delay", [GOOD], {"retry_delay_s": "Infinity"}, ValidationError,
         r"retry_delay_s\n.*finite number"),
    Case("infinite poll interval", [GOOD], {"waits.poll_interval_s": "Infinity"},
         ValidationError, r"waits\n.*poll_interval_s must be a finite number"),
    Case("boolean max_steps", [GOOD], {"max_steps": "true"}, ValidationError,
         r"max_steps\n.*expected a number, got the boolean true"),
    Case("boolean learning rate", [GOOD], {"learning_rate": "true"}, ValidationError,
         r"learning_rate\n.*got the boolean true"),
    Case("negative max_steps", [GOOD], {"max_steps": "-5"}, ValidationError,
         r"max_steps\n.*greater than 0"),
    Case("oversized max_steps", [GOOD], {"max_steps": "1e12"}, ValidationError, r"max_steps\n"),
    Case("oversized lora_rank", [GOOD], {"lora_rank": "100000"}, ValidationError,
         r"lora_rank\n.*less than or equal to 4096"),
    Case("huge seed", [GOOD], {"seed": str(2**70)}, ValidationError, r"seed\n"),
    Case("many flow retries", [GOOD], {"flow_retries": "1000"}, ValidationError,
         r"flow_retries\n"),
]  # fmt: skip


def _config(case: Case, tmp_path: Path) -> SFTConfig:
    assignments = [f"{key}={value}" for key, value in case.fields.items()]
    data: dict[str, Any] = {"max_steps": 4, "batch_size": 4}
    if case.lines is not None:
        path = tmp_path / "data.jsonl"
        path.write_text("\n".join(case.lines) + "\n", encoding="utf-8")
        data["dataset"] = str(path)
    return SFTConfig.model_validate(apply_overrides(data, assignments))


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_refused_before_compute(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # "." is a directory; no run directory may appear in it
    started = time.monotonic()
    with pytest.raises(case.error, match=case.match):
        load_sft_data(_config(case, tmp_path))
    assert time.monotonic() - started < 20
    assert not (tmp_path / "runs").exists()


def test_a_20_row_file_is_summarised_with_a_small_eval_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "twenty.jsonl"
    rows = [_row(f"{'ab' * (i % 4 + 1)}=", "ba") for i in range(19)] + [_row("x" * 80, "y")]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    config = SFTConfig(dataset=str(path), max_seq_len=40, batch_size=64)
    with caplog.at_level(logging.INFO, logger=NOTICE_LOGGER):
        data = load_sft_data(config)
    assert data.rendered is not None  # rendered at load time: the tokenizer was known
    lines = [r.getMessage() for r in caplog.records if r.name == NOTICE_LOGGER]
    text = "\n".join(lines)
    assert f"dataset {path}: 20 rows read; train 18, eval 2" in text
    assert "(eval from a carve-out of the training file)" in text
    assert "train tokens: " in text and "context 256" in text
    assert "train: 1 of 18 rows dropped: longer than max_seq_len 40 (line 20)" in text
    assert "batch_size 64 capped to 18" in text
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("the eval set has 2 rows" in r.getMessage() for r in warnings)


def test_a_toy_task_summary_names_its_eval_split(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=NOTICE_LOGGER):
        load_sft_data(SFTConfig(max_rows=32, eval_size=16, batch_size=8))
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == NOTICE_LOGGER)
    assert "dataset reverse: 32 rows read; train 32, eval 16 (eval from the reverse task's" in text
    assert "warning" not in text and "capped" not in text and "dropped" not in text


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize(
    ("knows_tokenizer", "where"),
    [(True, "before the run directory exists"), (False, "after provisioning, before a step")],
)
def test_a_run_stops_at_a_row_over_the_context(
    platform: LocalPlatform, tmp_path: Path, knows_tokenizer: bool, where: str
) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join([GOOD] * 6 + [TOO_LONG] + [GOOD] * 3) + "\n", encoding="utf-8")
    facts = local_model_facts("fireloop/tiny")
    assert facts is not None
    run_dir = tmp_path / ("known" if knows_tokenizer else "trainer")
    overrides: dict[str, Any] = {"dataset": str(data), "flow_retries": 0, "batch_size": 2}
    if knows_tokenizer:
        overrides["tokenizer_model"] = facts.tokenizer_dir
    with pytest.raises(DatasetError, match=r"rows\.jsonl:7: messages: .* context of 256"):
        run_sft(sft_config(platform, run_dir, **overrides))
    if knows_tokenizer:
        assert not run_dir.exists(), where
    else:
        assert not (run_dir / "metrics.jsonl").exists(), where
        assert not any(isinstance(row, CheckpointRow) for row in read_ledger(run_dir))
