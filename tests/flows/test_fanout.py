"""Reward and evaluation fan-out: shards, shipping rewards to workers, and thread vs Dask.

The Dask tests run a real `LocalCluster` with two worker processes, started by the flow itself
from its config (as a deployment would): starting it and its workers importing fireloop take a
few seconds of the module's time. Rewards come from `tests.flows.rl_rewards`, a module the
workers get by value, and from a built-in toy task's reward, which they import.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from algorithms.rewards import answer_integer_match
from algorithms.rl_data import PromptRow
from backend import LocalPlatform
from flows.config import RLConfig, TaskRunnerConfig
from flows.fanout import by_value, shards_of
from flows.ledger import EvaluationRow, read_ledger
from flows.rl import configured_rl_flow
from tests.flows import rl_rewards
from tests.flows.conftest import FAST_WAITS, platform_config
from tests.flows.support import jsonl

DASK = {"kind": "dask", "workers": 2}
_FLOW_PROCESS = os.getpid()


def parity_elsewhere(completion_text: str, row: PromptRow) -> float:
    """`parity`, refusing to run in the flow's own process: proof that Dask scored it."""
    if os.getpid() == _FLOW_PROCESS:
        raise RuntimeError("scored in the flow's process, not on a Dask worker")
    return float(sum(map(ord, completion_text)) % 2 == 0)


# Wall-clock metrics, which differ between any two runs.
_TIMINGS = ("perf/", "concurrency/", "time/", "train/tokens_per_sec")


@pytest.mark.parametrize(
    ("n", "shards", "sizes"),
    [(10, 4, [2, 3, 3, 2]), (3, 4, [1, 1, 1]), (8, 1, [8]), (0, 4, []), (5, 2, [2, 3])],
)
def test_shards_are_contiguous_near_equal_and_in_order(
    n: int, shards: int, sizes: list[int]
) -> None:
    parts = shards_of(list(range(n)), shards)
    assert [len(p) for p in parts] == sizes
    assert [x for p in parts for x in p] == list(range(n))


def test_an_address_needs_the_dask_kind() -> None:
    with pytest.raises(ValidationError, match="set kind to dask"):
        TaskRunnerConfig(address="tcp://127.0.0.1:8786")
    assert TaskRunnerConfig(kind="dask", address="tcp://127.0.0.1:8786").workers == 4


def test_a_reward_from_a_file_the_workers_lack_ships_by_value(tmp_path: Path) -> None:
    """Unpickled where `tests` does not import (another directory, no path to this checkout),
    the shipped reward still runs; a built-in ships by reference, as the image has it."""
    payload = pickle.dumps(by_value(rl_rewards.parity))
    script = (
        "import pickle, sys\n"
        "from algorithms.rl_data import PromptRow\n"
        "reward = pickle.loads(sys.stdin.buffer.read())\n"
        "row = PromptRow(messages=[{'role': 'user', 'content': '1+1'}])\n"
        "print(reward('ab', row), reward('b', row))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script],
        input=payload,
        capture_output=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().split() == ["0.0", "1.0"]  # 195 is odd, 98 even
    assert by_value(answer_integer_match) is answer_integer_match


def _rl_config(platform: LocalPlatform, run_dir: Path, **overrides: Any) -> RLConfig:
    fields: dict[str, Any] = {
        "run_name": run_dir.name,
        "run_dir": str(run_dir),
        "max_steps": 3,
        "checkpoint_every": 3,
        "eval_every": 3,
        "eval_size": 4,
        "flow_retries": 0,
        "waits": FAST_WAITS,
        "platform": platform_config(platform),
        "reward": "tests.flows.rl_rewards:parity",
        "completions_per_prompt": 4,
        "prompt_groups_per_step": 3,
        "max_completion_tokens": 6,
        "kl_beta": 0.0,
    }
    return RLConfig(**(fields | overrides))


def _run(config: RLConfig) -> tuple[list[Any], list[float], list[dict[str, Any]], dict[int, Any]]:
    """The run's logged rollouts (their log-probs apart), its per-step metrics without
    timings, and its evaluations."""
    state = configured_rl_flow(config)(config, return_state=True)
    assert state.is_completed(), state.message
    run_dir = Path(config.resolved_run_dir)
    rollouts = [e["value"] for e in jsonl(run_dir / "step_inputs.jsonl")]
    logprobs: list[float] = []
    for step in rollouts:  # the served snapshot's name holds the run's own job id
        for row in step["rows"]:
            for rollout in row["rollouts"]:
                assert rollout.pop("snapshot").startswith(f"step-{step['step']}-")
                logprobs.extend(rollout.pop("logprobs"))
    metrics = [
        {k: v for k, v in m.items() if not k.startswith(_TIMINGS) and "_time" not in k}
        for m in jsonl(run_dir / "metrics.jsonl")
    ]
    evaluations = {r.step: r.metrics for r in read_ledger(run_dir) if isinstance(r, EvaluationRow)}
    return rollouts, logprobs, metrics, evaluations


@pytest.mark.usefixtures("prefect_server")
def test_dask_scores_exactly_what_the_thread_pool_scores(
    platform: LocalPlatform, tmp_path: Path
) -> None:
    """Same rollouts, rewards, advantages and order; same per-step and eval metrics."""
    thread = _run(_rl_config(platform, tmp_path / "thread"))
    elsewhere = f"{__name__}:parity_elsewhere"
    dask = _run(_rl_config(platform, tmp_path / "dask", task_runner=DASK, reward=elsewhere))
    assert len(thread[0]) == 3 and sorted(thread[3]) == [0, 3]
    rewards = [r["reward"] for step in thread[0] for row in step["rows"] for r in row["rollouts"]]
    assert len(rewards) == 3 * 3 * 4 and len(set(rewards)) == 2  # parity tells them apart
    assert dask[0] == thread[0]  # tokens, rewards, advantages and row order exactly
    # Two runs' inference batches differ, so their log-probs agree to float noise only.
    assert dask[1] == pytest.approx(thread[1], rel=1e-5) and len(thread[1]) > len(rewards)
    for ours, theirs in [*zip(dask[2], thread[2], strict=True), (dask[3][3], thread[3][3])]:
        assert ours.keys() == theirs.keys()
        exact = {k for k, v in theirs.items() if not isinstance(v, float) or _from_rewards(k)}
        assert {k for k in exact if _from_rewards(k)}, theirs
        assert {k: ours[k] for k in exact} == {k: theirs[k] for k in exact}
        noisy = theirs.keys() - exact  # losses and entropies: float noise of the log-probs
        approx = pytest.approx({k: theirs[k] for k in noisy}, rel=1e-3, abs=1e-6)
        assert {k: ours[k] for k in noisy} == approx


def _from_rewards(metric: str) -> bool:
    return any(word in metric for word in ("reward", "accuracy", "pass@"))


@pytest.mark.usefixtures("prefect_server")
def test_a_reward_failing_on_a_dask_worker_fails_the_step_naming_the_row(
    platform: LocalPlatform, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    lines = [
        {"messages": [{"role": "user", "content": f"{p}=?"}], "ground_truth": "0"}
        for p in ("1+1", "4+1", "2+2")
    ]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = _rl_config(
        platform,
        tmp_path / "failing",
        dataset=str(prompts),
        reward="tests.flows.rl_rewards:raises_on_four",
        eval_every=0,
        task_runner=DASK,
    )
    state = configured_rl_flow(config)(config, return_state=True)
    assert state.is_failed()
    error = str(state.result(raise_on_failure=False))
    assert f"reward failed on {prompts}:2: ArithmeticError: no fours here" in error, error
    assert not (tmp_path / "failing" / "step_inputs.jsonl").exists()  # nothing trained on it
