"""A recipe written in a test runs through the shared machinery: the seam is real.

`ToyStep` is the whole recipe: the inputs of a step are a pure function of the data cursor, and
a step is a server cross-entropy pass plus AdamW. Run with a deployment, it gets checkpoints,
verified hotloads, its headline metric in the segment table and recovery from preemption, with
final weights and optimizer state bitwise equal to an uninterrupted run. `SampledToyStep` draws
its inputs from OS entropy (as an RL recipe's rollouts are not a function of the cursor) and
logs them in the durable step-inputs log before training: a run preempted three times must
equal, bit for bit, an uninterrupted run fed the inputs it logged, so no replayed step drew new
inputs.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, ClassVar

import pytest
from prefect import flow

from algorithms.datums import datum_from_tokens
from backend import LocalPlatform
from flows.config import RecipeConfig
from flows.ledger import CheckpointRow, HotloadRow, RunEndRow, RunHeader, read_ledger
from flows.lifecycle import RunResult
from flows.recipe_loop import Attempt, RecipePlan, run_recipe
from flows.step_inputs import StepInputsLog
from tasks.training import RecipeStep, StepInputs
from tests.flows.conftest import FAST_WAITS, platform_config
from tests.flows.support import assert_bitwise_equal, final_state, jsonl, read_run

pytestmark = pytest.mark.usefixtures("prefect_server")

STEPS = 9
LR = 1e-2


class ToyConfig(RecipeConfig):
    recipe: ClassVar[str] = "toy"
    headline_metric: ClassVar[str] = "train/toy_loss"
    wandb_project: ClassVar[str] = "toy"


class ToyStep(RecipeStep[list[int]]):
    """Teach the model to count: row `c` is the tokens c..c+7 (mod 50), one row per step."""

    headline_metric = "train/toy_loss"

    def inputs(self, step: int, cursor: int) -> StepInputs[list[int]]:
        return StepInputs([(cursor + k) % 50 + 1 for k in range(8)], (cursor,), cursor + 1, 0)

    def train(self, trainer: Any, step: int, data: list[int], timeout_s: float) -> dict[str, float]:
        datum = datum_from_tokens(data, [1.0] * len(data))
        loss = trainer.forward_backward([datum], "cross_entropy").result(timeout=timeout_s)
        trainer.optim_step(_adam(), grad_accumulation_normalization="num_loss_tokens").result(
            timeout=timeout_s
        )
        return {"train/toy_loss": loss.metrics["loss:sum"] / (len(data) - 1), "train/lr": LR}


class SampledToyStep(ToyStep):
    """Inputs that no cursor determines, logged durably before a step trains on them."""

    def __init__(self, log: StepInputsLog) -> None:
        self.log = log

    def inputs(self, step: int, cursor: int) -> StepInputs[list[int]]:
        key = f"step-{step}"
        if key not in self.log:  # a replayed step finds what the lost attempt trained on
            self.log.append({key: [random.SystemRandom().randrange(1, 50) for _ in range(8)]})
        return StepInputs(list(self.log.get(key)), (cursor,), cursor + 1, 0)

    def inputs_position(self) -> int | None:
        return self.log.position


class ReplayStep(ToyStep):
    """The uninterrupted reference for `SampledToyStep`: fed the inputs another run logged."""

    def __init__(self, logged: dict[int, list[int]]) -> None:
        self.logged = logged

    def inputs(self, step: int, cursor: int) -> StepInputs[list[int]]:
        return StepInputs(self.logged[step], (cursor,), cursor + 1, 0)


def _adam() -> Any:
    from tinker import types

    return types.AdamParams(learning_rate=LR)


@flow(name="toy", retries=4, retry_delay_seconds=0, persist_result=False)
def toy_flow(config: ToyConfig, kind: str, logged: dict[int, list[int]] | None = None) -> RunResult:
    def prepare(attempt: Attempt) -> RecipePlan:
        if kind == "sampled":
            return RecipePlan(SampledToyStep(StepInputsLog(config.resolved_run_dir)))
        if kind == "replay":
            assert logged is not None
            return RecipePlan(ReplayStep(logged))
        return RecipePlan(ToyStep())

    return run_recipe(config, dataset_fingerprint="toy-counting", prepare=prepare)


def _config(platform: LocalPlatform, run_dir: Path, **overrides: Any) -> ToyConfig:
    fields: dict[str, Any] = {
        "run_name": run_dir.name,
        "run_dir": str(run_dir),
        "max_steps": STEPS,
        "checkpoint_every": 3,
        "hotload_every": 0,
        "eval_every": 0,
        "flow_retries": 4,  # the flow writes its config's retries onto its run: three preemptions
        "retry_delay_s": 0,
        "waits": FAST_WAITS,
        "platform": platform_config(platform),
    }
    return ToyConfig(**(fields | overrides))


def test_a_recipe_defined_in_a_test_gets_checkpoints_hotloads_and_recovery(
    platform: LocalPlatform, tmp_path: Path
) -> None:
    straight = _config(platform, tmp_path / "toy-straight", hotload_every=4)
    assert toy_flow(straight, "cursor").steps_done == STEPS
    preempted = _config(platform, tmp_path / "toy-preempted", hotload_every=4)
    platform.schedule_preemption([2, 5, 7])
    state = toy_flow(preempted, "cursor", return_state=True)
    assert state.is_completed(), state.message
    assert read_run(state).run_count == 4  # three lost trainers, each retried by Prefect

    rows = read_ledger(tmp_path / "toy-preempted")
    assert [r.next_step for r in rows if isinstance(r, CheckpointRow)] == [3, 6, 9]
    hotloads = [r for r in rows if isinstance(r, HotloadRow)]
    # Every cadence point hotloaded, verified; a replayed segment hotloads its point again.
    assert {h.step for h in hotloads} == {4, 8, 9} and all(h.verified for h in hotloads)
    assert isinstance(rows[-1], RunEndRow)
    assert isinstance(rows[0], RunHeader) and rows[0].recipe == "toy"
    losses = [m["train/toy_loss"] for m in jsonl(tmp_path / "toy-preempted" / "metrics.jsonl")]
    straight_losses = [
        m["train/toy_loss"] for m in jsonl(tmp_path / "toy-straight" / "metrics.jsonl")
    ]
    assert losses == straight_losses and len(losses) == STEPS
    assert_bitwise_equal(
        final_state(platform, tmp_path / "toy-straight", STEPS),
        final_state(platform, tmp_path / "toy-preempted", STEPS),
    )
    table = read_run(state).artifact("segments")
    assert "mean_toy_loss" in str(table)  # the recipe's headline metric, not SFT's


def test_logged_inputs_are_replayed_after_preemption_never_drawn_again(
    platform: LocalPlatform, tmp_path: Path
) -> None:
    run_dir = tmp_path / "toy-sampled"
    config = _config(platform, run_dir)
    platform.schedule_preemption([2, 4, 8])  # 4: after the step-3 save; 8: two steps past step-6
    state = toy_flow(config, "sampled", return_state=True)
    assert state.is_completed(), state.message
    assert read_run(state).run_count == 4

    log = StepInputsLog(str(run_dir))
    assert log.position == STEPS  # one entry per step: no replayed step logged a second draw
    logged = {step: log.get(f"step-{step}") for step in range(STEPS)}
    checkpoints = [r for r in read_ledger(run_dir) if isinstance(r, CheckpointRow)]
    assert [c.inputs_position for c in checkpoints] == [3, 6, 9]

    reference = _config(platform, tmp_path / "toy-replayed")
    assert toy_flow(reference, "replay", logged).steps_done == STEPS
    assert_bitwise_equal(
        final_state(platform, tmp_path / "toy-replayed", STEPS),
        final_state(platform, run_dir, STEPS),
    )
