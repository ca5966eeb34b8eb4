"""Recipe configuration: one pydantic model per flow, composed of small shared parts.

The parts (`RunPart`, `ModelPart`, `OptimizerPart`, `CadencePart`, `PlatformPart`,
`RecoveryPart`) each hold one concern; `RecipeConfig` joins them and each recipe's config adds
its own data, loss and evaluation fields and its defaults (its run-name prefix, its W&B
project, its headline metric), so no recipe's default sits in a shared part. The joined model
stays flat on purpose: a config file or `--set learning_rate=…` reads the same for every
recipe, and SFT configs written before the parts existed still load. A flow takes its config as
its one parameter, so Prefect renders it as a form; the API key is a `SecretStr` and shows
masked there, in logs and in `model_dump_json`. A `None` platform selects the embedded backend.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, ClassVar, Final, Literal, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from algorithms.advantages import AdvantageNorm
from algorithms.chat import TrainOnWhat
from algorithms.datums import GradNormalization, LossReduction
from algorithms.optimizer import AdamConfig, OptimizerPlan
from algorithms.rl_config import (
    CISPOConfig,
    DAPOConfig,
    DROConfig,
    GRPOConfig,
    GSPOConfig,
    ImportanceSamplingConfig,
    PolicyLoss,
    PolicyLossConfig,
    ReinforceConfig,
    TISConfig,
)
from algorithms.schedules import LRSchedule
from flows.scheduling import RUN_NAME_PATTERN, render_run_name, template_run_name
from tasks.platform import Waits
from tasks.teardown import TeardownPolicy

__all__ = [
    "DEFAULT_MAX_LINE_BYTES",
    "RUN_ONLY_FIELDS",
    "CadencePart",
    "DPOConfig",
    "DataPart",
    "ModelPart",
    "ORPOConfig",
    "OptimizerPart",
    "PlatformConfig",
    "PlatformPart",
    "PreferenceConfig",
    "PreferenceDataPart",
    "RLConfig",
    "RecipeConfig",
    "RecoveryPart",
    "RunPart",
    "SFTConfig",
    "TaskRunnerConfig",
    "WandbConfig",
    "training_identity_hash",
    "unique_run_name",
]

# Fields that change how a run is operated, observed or evaluated, but not what it trains:
# a resumed run may change them without its ledger calling it another run.
RUN_ONLY_FIELDS: Final = frozenset(
    {
        "run_dir",
        "run_name_template",
        "platform",
        "wandb",
        "teardown",
        "waits",
        "flow_retries",
        "retry_delay_s",
        "checkpoint_every",
        "hotload_every",
        "eval_every",
        "eval_dataset",
        "eval_size",
        "eval_max_tokens",
        "sample_eval",
        "max_line_bytes",
        "extend",
        "ref_batch_size",
        "release_reference_after_cache",
        "eval_completions_per_prompt",
        "eval_temperature",
        "sample_timeout_s",
        "inference_kl_fail",
        "write_trajectories",
        "task_runner",
    }
)
_RUN_NAME = RUN_NAME_PATTERN
# `<job id>:<checkpoint name>` or a bare checkpoint name: the names `save_state` takes.
_CHECKPOINT_REF = r"^([a-z0-9][a-z0-9-]{0,62}:)?[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# Upper bounds that no real run reaches: a typo (an extra zero, a wrong unit) fails here, in
# the config, instead of allocating or sleeping for ever on the platform.
_MAX_STEPS: Final = 10_000_000
_MAX_LORA_RANK: Final = 4096
_MAX_SEED: Final = 2**32 - 1
_MAX_RETRY_DELAY_S: Final = 3600.0
DEFAULT_MAX_LINE_BYTES: Final = 1 << 20


def _not_bool(value: object) -> object:
    """JSON and YAML booleans are ints to Python (`True == 1`); a number field refuses them."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
    return value


# Numbers as config fields take them: never a boolean; floats also never inf or NaN (the
# models set allow_inf_nan=False).
Count = Annotated[int, BeforeValidator(_not_bool)]
Number = Annotated[float, BeforeValidator(_not_bool)]


def unique_run_name(recipe: str) -> str:
    """`<recipe>-<UTC yyyymmdd-hhmmss>-<4 hex>`: a run nobody named gets a directory of its
    own, so two unnamed runs never meet in one ledger."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return f"{recipe}-{stamp}-{secrets.token_hex(2)}"


class _Part(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class PlatformConfig(_Part):
    """A platform to run on: the Fireworks platform or a standalone `fireloop backend`."""

    base_url: str = Field(description="Control-plane URL, e.g. https://api.fireworks.ai")
    api_key: SecretStr | None = Field(
        default=None,
        description=(
            "API key for direct runs only (a deployment's parameters are stored and shown in "
            "the UI: use api_key_secret or FIREWORKS_API_KEY there); empty: api_key_secret, "
            "else the FIREWORKS_API_KEY environment variable"
        ),
    )
    api_key_secret: str | None = Field(
        default=None,
        min_length=1,
        description="Name of a Prefect Secret block holding the API key, loaded at run start",
    )
    inference_url: str | None = Field(default=None, description="Default: base_url")
    hotload_api_url: str | None = Field(default=None, description="Default: base_url")
    trainer_job_id: str | None = Field(
        default=None, description="Reuse this trainer job (never deleted by teardown)"
    )
    deployment_id: str | None = Field(
        default=None, description="Reuse this deployment (never deleted by teardown)"
    )


class WandbConfig(_Part):
    """Weights & Biases logging; offline (files under run_dir) when no key is present."""

    entity: str | None = Field(default=None, description="W&B team or user; default: yours")
    project: str | None = Field(default=None, description="Default: the recipe's project")
    run_name: str | None = Field(default=None, description="Default: the run's name")
    mode: Literal["online", "offline"] | None = Field(
        default=None, description="Default: online with WANDB_API_KEY set, else offline"
    )


class RunPart(_Part):
    """Which run this is and where its files live; `recipe` (set by each recipe's config)
    names the run when nobody did."""

    recipe: ClassVar[str]

    # The real default comes from `_default_run_name`, which knows the recipe; the factory only
    # marks the field as generated (help and the Prefect form show it optional).
    run_name: str = Field(
        default_factory=str,
        pattern=_RUN_NAME,
        description=(
            "Names ids and artifacts; default: from run_name_template, else "
            "<recipe>-<UTC time>-<4 hex>, unique"
        ),
    )
    run_name_template: str | None = Field(
        default=None,
        description=(
            "Names an unnamed run from its scheduled start (UTC), e.g. "
            "'sft-nightly-{scheduled:%Y%m%d-%H%M}'; fields: {scheduled}, {recipe}"
        ),
    )
    run_dir: str | None = Field(
        default=None, description="Ledger, metrics, W&B files: a path or fsspec URL (./runs/<run>)"
    )

    @model_validator(mode="before")
    @classmethod
    def _default_run_name(cls, data: object) -> object:
        """A config without `run_name` is named by `run_name_template` from the flow run's
        scheduled start time, else a unique `<recipe>-…` name (a per-recipe default)."""
        if not isinstance(data, dict) or data.get("run_name") is not None:
            return data
        template = data.get("run_name_template")
        if isinstance(template, str):
            return {**data, "run_name": template_run_name(template, cls.recipe)}
        return {**data, "run_name": unique_run_name(cls.recipe)}

    @field_validator("run_name_template")
    @classmethod
    def _template_gives_a_name(cls, template: str | None) -> str | None:
        """A template is checked even when `run_name` wins, so a deployment's fails at once."""
        if template is not None:
            render_run_name(template, recipe=cls.recipe, scheduled=datetime.now(UTC))
        return template

    @property
    def resolved_run_dir(self) -> str:
        """`run_dir`, else `./runs/<run_name>` (absolute, so ids derived from it are stable)."""
        if self.run_dir:
            return self.run_dir.rstrip("/")
        return str(Path("runs", self.run_name).absolute())


class ModelPart(_Part):
    """The model trained and how: full-parameter or LoRA, and the seed of everything random."""

    base_model: str = Field(
        default="fireloop/tiny", min_length=1, description="Model to train (`fireloop models`)"
    )
    tokenizer_model: str | None = Field(
        default=None, description="HF id or directory; default: the trainer's tokenizer"
    )
    lora_rank: Count = Field(
        default=0, ge=0, le=_MAX_LORA_RANK, description="0 = full-parameter training"
    )
    lora_alpha: Count = Field(default=32, gt=0, le=1_000_000, description="LoRA scale numerator")
    seed: Count = Field(
        default=0, ge=0, le=_MAX_SEED, description="Data order, LoRA init, eval carve-out"
    )
    init_from_checkpoint: str | None = Field(
        default=None,
        pattern=_CHECKPOINT_REF,
        description=(
            "Start from a checkpoint ('<trainer job id>:<name>', or a name of this run's job): "
            "weights and optimizer state; step and data cursor start at 0"
        ),
    )


class OptimizerPart(_Part):
    """How many optimizer steps, at which learning rates, with which AdamW settings."""

    max_steps: Count = Field(
        default=100, gt=0, le=_MAX_STEPS, description="Optimizer steps in the run"
    )
    learning_rate: Number = Field(
        default=3e-3, gt=0, le=1.0, description="Peak LR (tiny: 3e-3; ~1e-4 real)"
    )
    lr_schedule: LRSchedule = Field(default="constant", description="Decay after warmup")
    warmup_steps: Count = Field(
        default=0, ge=0, le=_MAX_STEPS, description="Linear warmup steps (below max_steps)"
    )
    min_lr_ratio: Number = Field(
        default=0.0, ge=0, le=1, description="Floor of linear/cosine decay, as a share of peak"
    )
    adam: AdamConfig = Field(default=AdamConfig(), description="AdamW settings")

    @field_validator("adam")
    @classmethod
    def _sane_adam(cls, adam: AdamConfig) -> AdamConfig:
        _check_finite(adam)
        if adam.weight_decay > 1.0:
            raise ValueError(f"weight_decay must be at most 1, got {adam.weight_decay}")
        return adam

    @model_validator(mode="after")
    def _warmup_below_max_steps(self) -> Self:
        if self.warmup_steps >= self.max_steps and self.warmup_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below max_steps")
        return self

    def optimizer_plan(self, grad_normalization: GradNormalization) -> OptimizerPlan:
        """The `OptimizerPlan` of this run, with the normalisation the recipe's loss needs."""
        return OptimizerPlan(
            peak_lr=self.learning_rate,
            total_steps=self.max_steps,
            schedule=self.lr_schedule,
            warmup_steps=self.warmup_steps,
            min_lr_ratio=self.min_lr_ratio,
            adam=self.adam,
            grad_normalization=grad_normalization,
        )


class CadencePart(_Part):
    """When a run saves resumable state, hotloads its weights and evaluates."""

    checkpoint_every: Count = Field(
        default=20, gt=0, le=_MAX_STEPS, description="Resumable save cadence (steps)"
    )
    hotload_every: Count = Field(
        default=0,
        ge=0,
        le=_MAX_STEPS,
        description="Hotload cadence (steps); 0 = only when evaluating",
    )
    eval_every: Count = Field(
        default=20, ge=0, le=_MAX_STEPS, description="0 = only at the start and the end"
    )


class TaskRunnerConfig(_Part):
    """Where reward and evaluation scoring fans out: a few Prefect task runs per step, one per
    shard of the step's rows, on a thread pool (the default) or on Dask."""

    kind: Literal["thread", "dask"] = Field(
        default="thread", description="thread: this process; dask: worker processes or machines"
    )
    address: str | None = Field(
        default=None,
        description="Dask scheduler, e.g. tcp://scheduler:8786; empty: a temporary LocalCluster",
    )
    workers: Count = Field(
        default=4,
        gt=0,
        le=1024,
        description="Shards per step; also the threads, or the LocalCluster's worker processes",
    )

    @model_validator(mode="after")
    def _address_needs_dask(self) -> Self:
        if self.address is not None and self.kind != "dask":
            raise ValueError("task_runner.address names a Dask scheduler: set kind to dask")
        return self


class PlatformPart(_Part):
    """Where the run trains and reports, and what is left of its resources afterwards."""

    platform: PlatformConfig | None = Field(
        default=None, description="Empty: the embedded local backend"
    )
    wandb: WandbConfig | None = Field(default=None, description="Empty: no W&B logging")
    teardown: TeardownPolicy = Field(default="keep", description="After the run completes")
    waits: Waits | None = Field(
        default=None, description="Empty: SDK defaults (short polls on the embedded backend)"
    )
    task_runner: TaskRunnerConfig = Field(
        default=TaskRunnerConfig(), description="Where reward and eval scoring fans out"
    )

    @field_validator("waits")
    @classmethod
    def _finite_waits(cls, waits: Waits | None) -> Waits | None:
        if waits is not None:
            _check_finite(waits)
        return waits


class RecoveryPart(_Part):
    """How a run recovers from a lost trainer, and whether it continues a finished run."""

    flow_retries: Count = Field(
        default=2, ge=0, le=10, description="Flow retries (preemption recovery)"
    )
    retry_delay_s: Number = Field(
        default=30.0, ge=0, le=_MAX_RETRY_DELAY_S, description="Wait before a flow retry"
    )
    extend: bool = Field(
        default=False,
        description=(
            "Continue this run (finished or not) to a larger max_steps, all else unchanged; "
            "needs lr_schedule constant (a decaying schedule is laid out over max_steps)"
        ),
    )


def _check_finite(part: BaseModel) -> None:
    """The parts defined in `tasks/` and `algorithms/` allow inf; a run's config never does."""
    for name, value in part:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")


# Pydantic lists the fields of several bases last base first: the parts are named in reverse,
# so a config's fields read run, model, optimizer, cadence, platform, recovery, then the
# recipe's own.
class RecipeConfig(RecoveryPart, PlatformPart, CadencePart, OptimizerPart, ModelPart, RunPart):
    """What every recipe shares, composed of the parts above; a recipe's config adds its data,
    loss and evaluation fields and sets `recipe`, `headline_metric` and `wandb_project`."""

    headline_metric: ClassVar[str]
    wandb_project: ClassVar[str]

    @property
    def needs_deployment(self) -> bool:
        """Whether the run hotloads: a hotload cadence (recipes that sample say more)."""
        return self.hotload_every > 0

    @property
    def hotload_interval(self) -> int:
        """Steps between hotloads (0: only when evaluating or at the end)."""
        return self.hotload_every

    @property
    def samples_in_eval(self) -> bool:
        """Whether evaluation samples the deployment (then a hotload precedes it)."""
        return False


class DataPart(_Part):
    """The rows a recipe trains and evaluates on; each recipe names its default dataset."""

    dataset: str = Field(description="A JSONL path/URL or a toy task name (`fireloop tasks`)")
    max_rows: Count | None = Field(default=None, gt=0, description="Cap on training rows read")
    max_line_bytes: Count = Field(
        default=DEFAULT_MAX_LINE_BYTES,
        gt=0,
        le=1 << 30,
        description="Longest JSONL line accepted (bytes); longer lines are refused",
    )
    shuffle: bool = Field(default=True, description="Shuffle rows each epoch (seeded)")
    eval_dataset: str | None = Field(
        default=None,
        description="JSONL or toy task; default: the toy task's eval split or a carve-out",
    )
    eval_size: Count = Field(default=64, gt=0, le=100_000, description="Evaluation rows")

    @field_validator("dataset", "eval_dataset")
    @classmethod
    def _named(cls, source: str | None) -> str | None:
        if source is not None and not source.strip():
            raise ValueError("dataset is empty: name a JSONL file or a toy task (`fireloop tasks`)")
        return source


class SFTConfig(DataPart, RecipeConfig):
    """Supervised fine-tuning on chat JSONL or a built-in toy task."""

    recipe: ClassVar[str] = "sft"
    headline_metric: ClassVar[str] = "train/ce_loss"
    wandb_project: ClassVar[str] = "sft-tinker"

    dataset: str = Field(
        default="reverse",
        description="A chat JSONL path/URL or a toy task name (`fireloop tasks`)",
    )
    batch_size: Count = Field(
        default=64, gt=0, le=1 << 16, description="Rows per optimizer step (capped to the set)"
    )
    train_on_what: TrainOnWhat = Field(
        default="all_assistant_messages", description="Which tokens carry loss"
    )
    loss_reduction: LossReduction = Field(
        default="batch_token_mean", description="How token losses become the step's loss"
    )
    max_seq_len: Count | None = Field(
        default=None,
        gt=1,
        le=1 << 20,
        description="Rows with more tokens are dropped (counted); default: refuse over context",
    )
    eval_max_tokens: Count = Field(
        default=16, gt=0, le=1 << 16, description="Tokens sampled per eval prompt"
    )
    sample_eval: bool = Field(
        default=True, description="Exact match by sampling a hotloaded deployment"
    )

    @property
    def needs_deployment(self) -> bool:
        """Whether the run hotloads (a cadence, or sample-based evaluation)."""
        return self.hotload_every > 0 or self.sample_eval

    @property
    def samples_in_eval(self) -> bool:
        return self.sample_eval


class PreferenceDataPart(DataPart):
    """The pairs a preference recipe (DPO, ORPO) trains and evaluates on."""

    dataset: str = Field(
        default="reverse_pairs",
        description="A preference JSONL path/URL or a toy task name (`fireloop tasks`)",
    )
    batch_size: Count = Field(
        default=4, gt=0, le=1 << 16, description="Pairs per optimizer step (capped to the set)"
    )


class PreferenceConfig(PreferenceDataPart, RecipeConfig):
    """What DPO and ORPO share: a recipe config with preference pairs to train on."""


class DPOConfig(PreferenceConfig):
    """Direct preference optimisation against a frozen reference (the base model)."""

    recipe: ClassVar[str] = "dpo"
    headline_metric: ClassVar[str] = "train/dpo_loss"
    wandb_project: ClassVar[str] = "dpo-tinker"

    beta: Number = Field(
        default=0.1, gt=0, le=1000, description="DPO temperature: how far from the reference"
    )
    ref_batch_size: Count = Field(
        default=16, gt=0, le=4096, description="Pairs per reference forward when caching"
    )
    release_reference_after_cache: bool = Field(
        default=True, description="Unload the reference model once its cache is complete"
    )

    @model_validator(mode="after")
    def _reference_is_the_start(self) -> Self:
        # DPO measures the policy against the model it started from; the reference here is the
        # base model, so a run started from another checkpoint would be measured against the
        # wrong model.
        if self.init_from_checkpoint is not None:
            raise ValueError(
                "init_from_checkpoint is not supported for DPO yet: its reference is the base "
                "model, which would no longer be the policy's starting point"
            )
        return self


class ORPOConfig(PreferenceConfig):
    """Odds-ratio preference optimisation: SFT on the chosen side plus a log-odds penalty,
    with no reference model."""

    recipe: ClassVar[str] = "orpo"
    headline_metric: ClassVar[str] = "train/orpo_loss"
    wandb_project: ClassVar[str] = "dsv3-training"  # the Fireworks cookbook's ORPO project

    orpo_lambda: Number = Field(
        default=1.0, ge=0, le=1000, description="Weight of the odds-ratio term (0 = plain SFT)"
    )
    pair_reduction: Literal["mean", "sum"] = Field(
        default="mean", description="Pair losses to the step loss (sum: the cookbook's)"
    )


class RLConfig(DataPart, RecipeConfig):
    """Reinforcement learning from rewards on sampled completions: GRPO and its relatives.

    Each step samples `completions_per_prompt` (G) completions of `prompt_groups_per_step` (P)
    prompts from the deployment, scores them with `reward`, and trains on group-relative
    advantages. The deployment serves the policy of the moment: a verified hotload ends every
    window of `weight_sync_interval` steps (`hotload_every` does not apply).
    """

    recipe: ClassVar[str] = "rl"
    headline_metric: ClassVar[str] = "rollout/raw_reward"
    wandb_project: ClassVar[str] = "rl-tinker"

    dataset: str = Field(
        default="addition",
        description="An RL prompt JSONL path/URL or an RL toy task (`fireloop tasks`)",
    )
    reward: str | None = Field(
        default=None,
        description="'module:function' or a built-in; default: the task's, else integer match",
    )
    policy_loss: PolicyLoss = Field(default="grpo", description="The policy-gradient loss")
    loss_path: Literal["client", "builtin"] = Field(
        default="client", description="client: closure on the client; builtin: server loss"
    )
    completions_per_prompt: Count = Field(
        default=4, gt=0, le=1024, description="G: completions sampled per prompt (the group)"
    )
    prompt_groups_per_step: Count = Field(
        default=1, gt=0, le=4096, description="P: prompts (groups) per optimizer step"
    )
    max_completion_tokens: Count | None = Field(
        default=None,
        gt=0,
        le=1 << 20,
        description="Tokens per completion; default: 1024, or what the context leaves",
    )
    temperature: Number = Field(
        default=1.0, gt=0, le=10, description="Sampling temperature (top_p 1, top_k off)"
    )
    kl_beta: Number = Field(
        default=0.001, ge=0, le=100, description="k3 KL to the base model; > 0 loads it"
    )
    advantage_norm: AdvantageNorm = Field(
        default="zscore", description="zscore, or mean_center (Dr. GRPO)"
    )
    filter_constant_reward_groups: bool = Field(
        default=True, description="Drop groups whose rewards are all equal (no signal)"
    )
    grpo: GRPOConfig = Field(default=GRPOConfig(), description="GRPO clip range")
    dapo: DAPOConfig = Field(default=DAPOConfig(), description="DAPO clip-higher, dual clip")
    gspo: GSPOConfig = Field(default=GSPOConfig(), description="GSPO sequence-ratio clip")
    cispo: CISPOConfig = Field(default=CISPOConfig(), description="CISPO weight clip")
    dro: DROConfig = Field(default=DROConfig(), description="DRO quadratic pull")
    importance_sampling: ImportanceSamplingConfig = Field(
        default=ImportanceSamplingConfig(), description="Unclipped importance sampling"
    )
    reinforce: ReinforceConfig = Field(default=ReinforceConfig(), description="REINFORCE")
    tis: TISConfig = Field(default=TISConfig(), description="Train/inference importance weight")
    anchor_logp: Literal["old_policy", "rollout"] = Field(
        default="old_policy", description="pi_old: a trainer forward, or the sampler's logprobs"
    )
    ppo_n_minibatches: Count = Field(
        default=1, gt=0, le=1024, description="Optimizer passes over each rollout batch"
    )
    loss_reduction: Literal["token_mean", "sequence_mean"] = Field(
        default="token_mean", description="How token losses become the step's loss"
    )
    weight_sync_interval: Count = Field(
        default=1, ge=0, le=_MAX_STEPS, description="Steps per policy window (0: never hotload)"
    )
    max_offpolicy_versions: Count = Field(
        default=0, ge=0, le=2, description="O: async sampling this many versions ahead (0: sync)"
    )
    sample_timeout_s: Number = Field(
        default=600.0, gt=0, le=86_400, description="Per completion (seconds)"
    )
    eval_completions_per_prompt: Count = Field(
        default=4, gt=0, le=1024, description="Completions per eval prompt (pass@k up to it)"
    )
    eval_temperature: Number = Field(
        default=1.0, ge=0, le=10, description="Eval sampling temperature (0: greedy)"
    )
    inference_kl_fail: Number | None = Field(
        default=None, gt=0, description="Fail when train/inference_kld exceeds it"
    )
    write_trajectories: bool = Field(
        default=True, description="Per-step trajectories under <run_dir>/trajectories/"
    )

    @property
    def needs_deployment(self) -> bool:
        return True

    @property
    def samples_in_eval(self) -> bool:
        return True

    @property
    def hotload_interval(self) -> int:
        return self.weight_sync_interval

    @property
    def loss_config(self) -> PolicyLossConfig:
        """The hyperparameters of `policy_loss`."""
        config: PolicyLossConfig = getattr(self, self.policy_loss)
        return config

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        """Combinations no run can train correctly, refused before anything starts."""
        for problem in _rl_problems(self):
            raise ValueError(problem)
        return self


def _rl_problems(config: RLConfig) -> list[str]:
    problems: list[str] = []
    if config.completions_per_prompt == 1 and config.advantage_norm == "zscore":
        problems.append(
            "completions_per_prompt=1 with advantage_norm='zscore': a group of one has no std "
            "(every advantage is 0); sample G >= 2 per prompt"
        )
    if config.loss_path == "builtin" and config.kl_beta > 0:
        problems.append(
            f"kl_beta={config.kl_beta} with loss_path='builtin': the server loss cannot see "
            "reference log-probs; set kl_beta=0 or loss_path='client'"
        )
    if config.loss_path == "builtin" and config.policy_loss == "reinforce":
        problems.append(
            "policy_loss='reinforce' has no builtin server loss; use loss_path='client'"
        )
    if config.policy_loss == "dapo" and config.kl_beta > 0:
        problems.append(f"kl_beta={config.kl_beta} with policy_loss='dapo': DAPO has no KL term")
    if config.kl_beta > 0 and config.init_from_checkpoint is not None:
        problems.append(
            "kl_beta > 0 with init_from_checkpoint: the KL reference is the base model, not the "
            "checkpoint the policy starts from; set kl_beta=0"
        )
    if config.hotload_every:
        problems.append("hotload_every does not apply to RL: set weight_sync_interval")
    window = config.weight_sync_interval
    if window and config.checkpoint_every % window:
        problems.append(
            f"checkpoint_every={config.checkpoint_every} must be a multiple of "
            f"weight_sync_interval={window}: resumable saves happen only at window ends"
        )
    if config.max_offpolicy_versions and window != 1:
        problems.append(
            f"max_offpolicy_versions={config.max_offpolicy_versions} needs weight_sync_interval=1"
            " (async RL hotloads after every step)"
        )
    samples = config.completions_per_prompt * config.prompt_groups_per_step
    if config.ppo_n_minibatches > samples:
        problems.append(
            f"ppo_n_minibatches={config.ppo_n_minibatches} exceeds the {samples} samples of a step"
        )
    if config.reward is not None:
        from algorithms.rewards import RewardLoadError, load_reward

        try:
            load_reward(config.reward)
        except RewardLoadError as exc:
            problems.append(str(exc))
    return problems


def training_identity_hash(config: BaseModel) -> str:
    """`sha256:<hex>` of the fields that decide what is trained (all but `RUN_ONLY_FIELDS`)."""
    fields = config.model_dump(mode="json", exclude=set(RUN_ONLY_FIELDS))
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()
