"""The RL flow end to end on the local platform: on-policy sampling, every loss, exact recovery,
async mode under preemption, learning after the SFT warm start, and bad inputs.

Random-init rollouts never earn a task reward, so most tests score them with
`tests.flows.rl_rewards:parity`, which gives the completions of one group different rewards.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from algorithms.datasets import next_batch
from algorithms.rl_data import ADDITION_PROMPTS
from backend import LocalPlatform
from flows.config import RLConfig
from flows.embedded import local_model_facts
from flows.ledger import CheckpointRow, EvaluationRow, HotloadRow, RunEndRow, read_ledger
from flows.rl import configured_rl_flow
from flows.rl_demo import RLDemoConfig, rl_demo_flow
from tests.flows.conftest import FAST_WAITS, platform_config
from tests.flows.support import assert_bitwise_equal, final_state, jsonl, preempt_during_save

pytestmark = pytest.mark.usefixtures("prefect_server")

PARITY = "tests.flows.rl_rewards:parity"
G, P = 4, 2


def rl_config(platform: LocalPlatform, run_dir: Path, **overrides: Any) -> RLConfig:
    fields: dict[str, Any] = {
        "run_name": run_dir.name,
        "run_dir": str(run_dir),
        "max_steps": 4,
        "checkpoint_every": 2,
        "eval_every": 0,
        "retry_delay_s": 0,
        "waits": FAST_WAITS,
        "platform": platform_config(platform),
        "reward": PARITY,
        "completions_per_prompt": G,
        "prompt_groups_per_step": P,
        "max_completion_tokens": 6,
        "kl_beta": 0.0,
    }
    return RLConfig(**(fields | overrides))


def _run(config: RLConfig) -> None:
    state = configured_rl_flow(config)(config, return_state=True)
    assert state.is_completed(), state.message


def _logged_rollouts(run_dir: Path) -> dict[int, dict[str, Any]]:
    entries = jsonl(run_dir / "step_inputs.jsonl")
    return {int(e["key"].split(":")[1]): e["value"] for e in entries}


def test_on_policy_rl_samples_the_weights_it_trains(
    platform: LocalPlatform, tmp_path: Path
) -> None:
    run_dir = tmp_path / "on-policy"
    _run(rl_config(platform, run_dir, kl_beta=0.001))

    metrics = jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    trained = [m for m in metrics if "train/inference_kld" in m]
    assert len(trained) >= 3
    # The sampler's log-probs are the trainer's at the same weights: the hotload serves them.
    assert max(m["train/inference_kld"] for m in trained) <= 1e-4
    for m in trained:
        assert m["train/ref_kl"] >= 0 and m["async/version_offset_max"] == 0
        for key in ("train/grad_norm", "train/mean_loss", "train/ppo_clip_frac", "train/lr"):
            assert key in m, key
    for m in metrics:
        for key in ("rollout/raw_reward", "rollout/accuracy", "rollout/pass@4", "rollout/entropy"):
            assert key in m, key
        assert m["rollout/samples_completed"] == P * G

    # Each step's rollouts came from the snapshot hotloaded at its start.
    rows = read_ledger(run_dir)
    served = {h.step: h.identity for h in rows if isinstance(h, HotloadRow)}
    logged = _logged_rollouts(run_dir)
    assert sorted(logged) == [0, 1, 2, 3]
    for step, value in logged.items():
        snapshots = {r["snapshot"] for row in value["rows"] for r in row["rollouts"]}
        assert snapshots == {served[step]}, (step, snapshots)

    trajectories = sorted((run_dir / "trajectories").glob("step-*.jsonl"))
    assert [t.name for t in trajectories] == [f"step-00000{i}.jsonl" for i in range(4)]
    lines = jsonl(trajectories[0])
    assert len(lines) == P * G and {"prompt", "completion", "reward", "advantage"} <= set(lines[0])

    evaluations = {r.step: r.metrics for r in rows if isinstance(r, EvaluationRow)}
    assert sorted(evaluations) == [0, 4]
    assert {"eval/reward", "eval/accuracy", "eval/pass@1", "eval/pass@4"} <= set(evaluations[4])
    assert isinstance(rows[-1], RunEndRow)


@pytest.mark.parametrize(
    ("policy_loss", "overrides", "own_metric"),
    [
        ("grpo", {"loss_path": "builtin", "ppo_n_minibatches": 2}, "train/grad_norm"),
        ("dapo", {"dapo": {"eps_clip_c": 3.0}}, "train/dapo_clip_frac"),
        ("gspo", {"kl_beta": 0.01}, "train/gspo_clip_frac"),
        ("cispo", {"anchor_logp": "rollout"}, "train/cispo_clip_frac"),
        ("dro", {"loss_path": "builtin"}, "train/grad_norm"),
        ("dro", {"advantage_norm": "mean_center"}, "train/dro_quad_penalty"),
        ("importance_sampling", {"tis": {"level": "sequence"}}, "train/is_ratio_mean"),
        ("reinforce", {"kl_beta": 0.01}, "train/is_ratio_mean"),
    ],
)
def test_every_loss_trains(
    platform: LocalPlatform,
    tmp_path: Path,
    policy_loss: str,
    overrides: dict[str, Any],
    own_metric: str,
) -> None:
    run_dir = tmp_path / f"loss-{policy_loss.replace('_', '-')}"
    config = rl_config(
        platform, run_dir, policy_loss=policy_loss, max_steps=2, eval_every=0, **overrides
    )
    _run(config)
    trained = [m for m in jsonl(run_dir / "metrics.jsonl") if "train/grad_norm" in m]
    assert trained, "no step trained"
    for m in trained:
        assert m[own_metric] == m[own_metric]  # present and not NaN
        assert m["train/grad_norm"] > 0


def _preempt_during_hotload(
    platform: LocalPlatform, prefix: str, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> list[str]:
    """Preempt the run's trainer once, as the deployment starts loading snapshot `prefix…`."""
    original = platform.state.hotload.load
    fired: list[str] = []

    def load(deployment: Any, model: Any, body: Any) -> Any:
        if body.identity.startswith(prefix) and not fired:
            rows = [r for r in read_ledger(run_dir) if isinstance(r, CheckpointRow)]
            job_id = rows[-1].job_id
            assert job_id is not None
            fired.append(job_id)
            platform.preempt(job_id)
        return original(deployment, model, body)

    monkeypatch.setattr(platform.state.hotload, "load", load)
    return fired


def test_preempted_sync_rl_equals_an_uninterrupted_run(
    platform: LocalPlatform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three preemptions (after a step, during a save, during a hotload); then an uninterrupted
    run fed the same rollouts (the sampler's numerics vary between two deployments, so two
    independent runs would differ in the last bits of π_inf) must train identically."""
    fields: dict[str, Any] = {"max_steps": 8, "weight_sync_interval": 2, "kl_beta": 0.001}
    run_dir = tmp_path / "rl-preempted"
    preempted = rl_config(platform, run_dir, flow_retries=4, **fields)
    before = platform.fault_stats.preemptions
    platform.schedule_preemption([3])
    saved = preempt_during_save(platform, "step-4", monkeypatch)
    hotloaded = _preempt_during_hotload(platform, "step-6-", run_dir, monkeypatch)
    _run(preempted)
    assert saved and hotloaded
    assert platform.fault_stats.preemptions - before == 3
    # Every step sampled once: the replays read the log instead of sampling again.
    log = (run_dir / "step_inputs.jsonl").read_bytes()
    assert len(log.splitlines()) == 8

    straight_dir = tmp_path / "rl-straight"
    straight_dir.mkdir()
    (straight_dir / "step_inputs.jsonl").write_bytes(log)
    _run(rl_config(platform, straight_dir, **fields))
    assert (straight_dir / "step_inputs.jsonl").read_bytes() == log  # it sampled nothing

    want, got = jsonl(straight_dir / "metrics.jsonl"), jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in got] == list(range(8))
    for key in ("row_indices", "rollout/raw_reward", "train/mean_loss", "train/grad_norm"):
        assert [m.get(key) for m in got] == [m.get(key) for m in want], key
    assert_bitwise_equal(final_state(platform, straight_dir, 8), final_state(platform, run_dir, 8))


def test_async_rl_under_preemption_trains_every_row_once(
    platform: LocalPlatform, tmp_path: Path
) -> None:
    run_dir = tmp_path / "rl-async"
    config = rl_config(platform, run_dir, max_steps=8, max_offpolicy_versions=2, flow_retries=3)
    before = platform.fault_stats.preemptions
    platform.schedule_preemption([3, 6])
    _run(config)
    assert platform.fault_stats.preemptions - before == 2

    metrics = jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(8))
    trained_rows = [row for m in metrics for row in m["row_indices"]]
    n_rows = ADDITION_PROMPTS.default_rows["train"]
    stream, _ = next_batch(config.seed, 0, 8 * P, n_rows)
    assert (
        trained_rows == stream
    )  # every row of the stream once, in order: none twice, none skipped
    # A checkpoint's cursor counts exactly the rows its steps trained.
    for row in read_ledger(run_dir):
        if isinstance(row, CheckpointRow):
            assert row.data_cursor == row.next_step * P
    offsets = [m["async/version_offset_max"] for m in metrics if "async/version_offset_max" in m]
    assert max(offsets) >= 1  # it did sample ahead of the trainer
    assert len(_logged_rollouts(run_dir)) == 8


def test_grpo_after_the_sft_warm_start_raises_the_reward(tmp_path: Path) -> None:
    result = rl_demo_flow(RLDemoConfig(name="learn", runs_dir=str(tmp_path)))
    assert result.rl.steps_done == 60
    rewards = [m["rollout/raw_reward"] for m in jsonl(Path(result.rl.metrics_path))]
    first, last = statistics.fmean(rewards[:20]), statistics.fmean(rewards[-20:])
    assert last - first >= 0.2, (first, last)


# -- bad inputs: each refused before a trainer exists --------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"completions_per_prompt": 1}, "completions_per_prompt=1 with advantage_norm='zscore'"),
        ({"loss_path": "builtin", "kl_beta": 0.01}, "loss_path='builtin'"),
        ({"loss_path": "builtin", "policy_loss": "reinforce", "kl_beta": 0}, "no builtin"),
        ({"max_offpolicy_versions": 3}, "max_offpolicy_versions"),
        ({"policy_loss": "ppo2"}, "policy_loss"),
        ({"reward": "no_such_module_here:reward"}, "does not import"),
        ({"reward": "tests.flows.rl_rewards:missing"}, "has no 'missing'"),
        ({"checkpoint_every": 3, "weight_sync_interval": 2}, "multiple of"),
    ],
)
def test_bad_rl_configs_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RLConfig(**fields)


def _prompt_file(path: Path, *problems: str) -> Path:
    lines = [
        f'{{"messages": [{{"role": "user", "content": "{p}="}}], "ground_truth": "0"}}\n'
        for p in problems
    ]
    path.write_text("".join(lines))
    return path


def test_a_prompt_longer_than_the_context_fails_before_provisioning(
    platform: LocalPlatform, tmp_path: Path
) -> None:
    prompts = _prompt_file(tmp_path / "prompts.jsonl", "1+1", "1+" * 150 + "1")
    facts = local_model_facts("fireloop/tiny")
    assert facts is not None
    config = rl_config(
        platform, tmp_path / "too-long", dataset=str(prompts), tokenizer_model=facts.tokenizer_dir
    )
    jobs_before = set((platform.data_dir / "jobs").glob("*"))
    state = configured_rl_flow(config)(config, return_state=True)
    assert state.is_failed()
    error = str(state.result(raise_on_failure=False))
    assert f"{prompts}:2" in error and "exceeds the context" in error, error
    assert set((platform.data_dir / "jobs").glob("*")) == jobs_before


@pytest.mark.parametrize("reward", ["raises_on_four", "nan_on_four"])
def test_a_failing_reward_fails_the_step_naming_the_row(
    platform: LocalPlatform, tmp_path: Path, reward: str
) -> None:
    prompts = _prompt_file(tmp_path / "prompts.jsonl", "1+1", "4+1", "2+2")
    run_dir = tmp_path / reward.replace("_", "-")
    config = rl_config(
        platform,
        run_dir,
        dataset=str(prompts),
        reward=f"tests.flows.rl_rewards:{reward}",
        prompt_groups_per_step=3,
        flow_retries=0,
    )
    state = configured_rl_flow(config)(config, return_state=True)
    assert state.is_failed()
    error = str(state.result(raise_on_failure=False))
    assert f"reward failed on {prompts}:2" in error, error
    assert not (run_dir / "step_inputs.jsonl").exists()  # nothing logged, nothing trained
    assert not any(isinstance(r, CheckpointRow) for r in read_ledger(run_dir))
