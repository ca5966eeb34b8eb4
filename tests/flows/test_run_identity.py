"""Run identity people can live with: unique default names, finished runs that say so, runs
extended on purpose, failed attempts that do not block their corrected rerun, and a notice
per cadence point."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from backend import LocalPlatform
from flows.config import SFTConfig
from flows.ledger import CheckpointRow, ExtensionRow, LedgerMismatchError, RunEndRow, read_ledger
from flows.notices import NOTICE_LOGGER
from flows.sft import run_sft
from sdk import BadRequestError
from tests.flows.conftest import sft_config
from tests.flows.support import jsonl

pytestmark = pytest.mark.usefixtures("prefect_server")


def _losses(run_dir: Path) -> list[float]:
    return [row["train/ce_loss"] for row in jsonl(run_dir / "metrics.jsonl")]


def _notices(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == NOTICE_LOGGER]


def test_a_run_without_a_name_gets_a_unique_one() -> None:
    first, second = SFTConfig(), SFTConfig()
    assert re.fullmatch(r"sft-\d{8}-\d{6}-[0-9a-f]{4}", first.run_name), first.run_name
    assert first.run_name != second.run_name
    assert first.resolved_run_dir != second.resolved_run_dir


def test_a_finished_run_is_extended_on_purpose_to_the_uninterrupted_result(
    platform: LocalPlatform, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=NOTICE_LOGGER)
    small = {"max_steps": 4, "checkpoint_every": 2, "batch_size": 8}
    straight_dir = tmp_path / "straight"
    straight = sft_config(
        platform, straight_dir, **small | {"max_steps": 6, "hotload_every": 3, "eval_every": 3}
    )
    run_sft(straight)
    shown = _notices(caplog)
    assert "checkpoint step-2 saved at step 2" in shown
    assert any(
        re.fullmatch(r"hotload of step 3 verified on .* \(base, snapshot .*\)", n) for n in shown
    )
    assert any(n.startswith("evaluation at step 3: eval/loss=") for n in shown)
    assert any(n.startswith("run straight complete: 6 steps") for n in shown)

    run_dir = tmp_path / "extended"
    # The extended run must have the same name as the straight one: the name is part of the
    # training identity, and both compare losses step for step.
    first = sft_config(platform, run_dir, run_name="straight", **small)
    done = run_sft(first)
    assert (done.steps_done, done.already_complete) == (4, False)

    caplog.clear()
    again = run_sft(first)
    assert again.already_complete and again.steps_done == 4
    assert any("is already complete (4 steps" in n and "extend=true" in n for n in _notices(caplog))

    longer = first.model_copy(update={"max_steps": 6})
    with pytest.raises(
        LedgerMismatchError, match=r"max_steps is 4 in the ledger but 6.*extend=true"
    ):
        run_sft(longer)

    caplog.clear()
    extended = run_sft(longer.model_copy(update={"extend": True}))
    assert (extended.steps_done, extended.already_complete) == (6, False)
    assert "resumed from step-4: next step 4, data cursor 32" in _notices(caplog)
    rows = read_ledger(run_dir)
    kinds = [type(row).__name__ for row in rows if isinstance(row, ExtensionRow | RunEndRow)]
    assert kinds == ["RunEndRow", "ExtensionRow", "RunEndRow"]
    assert [r.next_step for r in rows if isinstance(r, CheckpointRow)] == [2, 4, 6]
    assert _losses(run_dir) == _losses(straight_dir)  # bit for bit: same data, same steps
    assert run_sft(longer).already_complete  # extend is needed once, not every time


def test_a_failed_attempt_that_recorded_nothing_does_not_block_its_fix(
    platform: LocalPlatform, tmp_path: Path
) -> None:
    run_dir = tmp_path / "typo"
    wrong = sft_config(platform, run_dir, base_model="fireloop/tinyy", max_steps=2)
    with pytest.raises(BadRequestError, match="tinyy"):
        run_sft(wrong)
    assert [type(row).__name__ for row in read_ledger(run_dir)] == ["RunHeader"]
    fixed = run_sft(wrong.model_copy(update={"base_model": "fireloop/tiny"}))
    assert fixed.steps_done == 2


def test_the_result_says_what_outlives_a_remote_run(
    platform: LocalPlatform, tmp_path: Path
) -> None:
    run_dir = tmp_path / "remote"
    result = run_sft(sft_config(platform, run_dir, max_steps=2, teardown="delete"))
    assert result.platform == "remote" and result.run_dir == str(run_dir)
    assert result.trainer_after == "deleted" and result.deployment_after is None
    assert result.checkpoint_dir is None and result.platform_data_dir is None
    assert Path(result.metrics_path).is_file() and Path(result.ledger_path).is_file()
