"""The RL demo: supervised warm start, then RL from its checkpoint, as one parent Prefect flow.

RL on a random-init model has nothing to reinforce: no completion ever earns a reward. So the
demo first teaches the format with a short SFT run on `addition` (the answer, then stop), and
then RL from that run's last checkpoint raises the reward the SFT run left on the table. Both
runs are subflows of `rl-demo`, on one embedded platform (the RL run's trainer loads the SFT
job's checkpoint there), each with its own run directory and ledger, so each resumes on its own.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from flows.config import PlatformConfig, RLConfig, SFTConfig
from flows.embedded import EMBEDDED_WAITS, embedded_lease
from flows.lifecycle import RunResult
from flows.rl import configured_rl_flow
from flows.sft import configured_sft_flow

__all__ = ["RLDemoConfig", "RLDemoResult", "rl_demo_configs", "rl_demo_flow"]


class RLDemoConfig(BaseModel):
    """The demo's two runs, named `<name>-sft` and `<name>-rl` under `runs_dir/<name>`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,30}$")
    runs_dir: str = "runs"
    sft_steps: int = Field(default=15, gt=0)
    rl_steps: int = Field(default=60, gt=0)
    policy_loss: str = "grpo"
    seed: int = 0


class RLDemoResult(BaseModel):
    sft: RunResult
    rl: RunResult


def rl_demo_configs(
    config: RLDemoConfig, platform: PlatformConfig, start: str | None = None
) -> tuple[SFTConfig, RLConfig]:
    """The SFT and RL configs of the demo; the RL run starts from checkpoint `start`."""
    root = Path(config.runs_dir, config.name).absolute()
    common = {
        "platform": platform,
        "waits": EMBEDDED_WAITS,
        "seed": config.seed,
        "dataset": "addition",
        "retry_delay_s": 1.0,
    }
    sft = SFTConfig(
        run_name=f"{config.name}-sft",
        run_dir=str(root / "sft"),
        max_steps=config.sft_steps,
        batch_size=20,
        checkpoint_every=config.sft_steps,
        eval_every=0,
        **common,
    )
    rl = RLConfig.model_validate(
        {
            "run_name": f"{config.name}-rl",
            "run_dir": str(root / "rl"),
            "max_steps": config.rl_steps,
            "policy_loss": config.policy_loss,
            "kl_beta": 0.0,  # the KL reference would be the random base, not the warm start
            "completions_per_prompt": 8,
            "prompt_groups_per_step": 4,
            "max_completion_tokens": 8,
            "learning_rate": 3e-3,
            "checkpoint_every": 10,
            "eval_every": 10,
            "init_from_checkpoint": start,
            **common,
        }
    )
    return sft, rl


@flow(name="rl-demo", flow_run_name="rl-demo-{config.name}", persist_result=False)
def rl_demo_flow(config: RLDemoConfig) -> RLDemoResult:
    """SFT on `addition`, then RL from its last checkpoint; both on one embedded platform."""
    # The demo holds the platform for its whole life: each child run's lease ends with that
    # run, and the RL run needs the SFT run's job on the same platform.
    with embedded_lease(Path(config.runs_dir, config.name, "platform").absolute()) as endpoint:
        platform = PlatformConfig(base_url=endpoint.base_url, api_key=endpoint.api_key)
        sft, _ = rl_demo_configs(config, platform)
        sft_result = configured_sft_flow(sft)(sft)
        start = f"{sft_result.trainer_job_id}:{sft_result.last_checkpoint}"
        _, rl = rl_demo_configs(config, platform, start)
        return RLDemoResult(sft=sft_result, rl=configured_rl_flow(rl)(rl))
