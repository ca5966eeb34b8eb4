"""The RL flow's data: prompts and reward loaded before any trainer, rendered, rows scored.

`load_rl_data` validates the prompt files (or generates a toy task's), loads the reward and,
when the tokenizer is known before provisioning, renders every prompt: a bad row, a prompt too
long for the context or a reward that does not import fails the run before compute is spent.
`render_rl_data` renders every prompt and checks it leaves room for the completion in the
model's context. `RowScorer` turns sampled rows into scored groups: parsed at the first stop
token, rewarded, advantages computed, fanned out in shards on the config's task runner; a
reward that raises fails the step with the row's file and line.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import fsspec

from algorithms.chat import ChatRenderer
from algorithms.rewards import Reward, load_reward
from algorithms.rl_data import (
    RL_TASKS,
    PromptDataset,
    load_prompt_source,
    render_prompts,
    sample_seed,
)
from algorithms.rl_rollouts import RowRollouts, StepRollouts
from flows.config import RLConfig
from flows.fanout import FanOut
from flows.sft_data import context_length_of, known_tokenizer
from tasks.rollouts import RowRequest, SampledRow
from tasks.scoring import RowToScore, score_row, score_rows

__all__ = [
    "RLData",
    "RenderedRL",
    "RowScorer",
    "TrajectoryWriter",
    "eval_request",
    "load_rl_data",
    "render_rl_data",
    "row_request",
]

# The completion budget when the config leaves it open and the context allows it.
DEFAULT_COMPLETION_TOKENS: Final = 1024
# Eval seeds come from their own stream, so an eval row never shares a seed with a training row.
EVAL_SEED_SALT: Final = 0x5EED_E7A1
# A tokenizer that does not know its context limits nothing here; the trainer still checks.
_UNKNOWN_CONTEXT: Final = 1 << 30


@dataclass(frozen=True)
class RLData:
    """Validated training prompts, eval prompts (None: no evaluation) and the reward."""

    train: PromptDataset
    eval: PromptDataset | None
    reward: Reward
    reward_name: str

    @property
    def fingerprint(self) -> str:
        return self.train.fingerprint


def load_rl_data(config: RLConfig) -> RLData:
    """The prompts and reward the config names; every problem raises here, before compute."""
    train = load_prompt_source(
        config.dataset,
        split="train",
        seed=config.seed,
        max_rows=config.max_rows,
        max_line_bytes=config.max_line_bytes,
    )
    eval_data: PromptDataset | None = None
    task = RL_TASKS.get(config.dataset)
    if config.eval_dataset is not None:
        eval_data = load_prompt_source(
            config.eval_dataset,
            split="eval",
            seed=config.seed,
            max_rows=config.eval_size,
            max_line_bytes=config.max_line_bytes,
        )
    elif task is not None:
        rows = min(config.eval_size, task.default_rows["eval"])
        eval_data = task.dataset("eval", seed=config.seed, n_rows=rows)
    reward_name = config.reward or (task.reward if task is not None else "answer_integer_match")
    data = RLData(train, eval_data, load_reward(reward_name), reward_name)
    tokenizer = known_tokenizer(config)
    if tokenizer is not None:  # a prompt too long for the context fails now, not on the trainer
        from transformers import AutoTokenizer  # slow to import: only when it is used

        render_rl_data(data, ChatRenderer(AutoTokenizer.from_pretrained(tokenizer)), config)
    return data


@dataclass(frozen=True)
class RenderedRL:
    """Every prompt's ids, and the completion budget they leave in the context."""

    train: list[list[int]]
    eval: list[list[int]]
    max_completion_tokens: int


def render_rl_data(data: RLData, renderer: ChatRenderer, config: RLConfig) -> RenderedRL:
    """Render every prompt; a prompt that leaves no room for `max_completion_tokens` in the
    model's context fails naming its file and line (the default budget is 1024 tokens, or
    what the longest prompt leaves when that is less)."""
    context = context_length_of(renderer) or _UNKNOWN_CONTEXT
    budget = config.max_completion_tokens

    def render(dataset: PromptDataset | None, tokens: int) -> list[list[int]]:
        if dataset is None:
            return []
        return render_prompts(
            dataset, renderer, max_completion_tokens=tokens, context_length=context
        )

    if budget is None:  # what the longest prompt leaves, up to the default
        longest = max(len(ids) for ids in render(data.train, 1) + render(data.eval, 1))
        budget = max(1, min(DEFAULT_COMPLETION_TOKENS, context - longest))
    return RenderedRL(render(data.train, budget), render(data.eval, budget), budget)


def row_request(
    prompts: list[list[int]], row: int, position: int, seed: int, group_size: int
) -> RowRequest:
    """The request for dataset row `row` at stream position `position`: G seeds derived from
    (seed, position, sample), so every draw of the run has its own stream and a replay asks
    for the same ones."""
    seeds = [sample_seed(seed, position, sample) for sample in range(group_size)]
    return RowRequest(row=row, prompt=prompts[row], seeds=seeds)


def eval_request(prompts: list[list[int]], row: int, seed: int, group_size: int) -> RowRequest:
    """An eval row's request: the same seeds at every evaluation (common random numbers make
    two points' scores comparable)."""
    return row_request(prompts, row, row, seed ^ EVAL_SEED_SALT, group_size)


class RowScorer:
    """Scores sampled rows: each completion parsed here (the tokenizer stays with the flow),
    then rewarded with the group's advantages computed, in shards on the fan-out's task runner
    when there is one."""

    def __init__(
        self,
        data: PromptDataset,
        reward: Reward,
        renderer: ChatRenderer,
        fanout: FanOut | None = None,
    ) -> None:
        self.data, self.reward, self.renderer, self.fanout = data, reward, renderer, fanout

    def score(self, sampled: SampledRow, config: RLConfig) -> RowRollouts:
        """One row scored in this thread."""
        return score_row(
            self._parsed(sampled),
            self.reward,
            config.advantage_norm,
            config.filter_constant_reward_groups,
        )

    def score_all(
        self, sampled: Sequence[SampledRow], config: RLConfig, *, step: int, purpose: str
    ) -> list[RowRollouts]:
        """Every row scored, in order: task runs on the fan-out (`purpose` and `step` name
        them), or in this thread without one."""
        if self.fanout is None:
            return [self.score(row, config) for row in sampled]
        return self.fanout.map(
            score_rows,
            [self._parsed(row) for row in sampled],
            reward=self.reward,
            advantage_norm=config.advantage_norm,
            filter_constant=config.filter_constant_reward_groups,
            purpose=purpose,
            step=step,
        )

    def _parsed(self, sampled: SampledRow) -> RowToScore:
        row = sampled.request.row
        return RowToScore(
            sampled=sampled,
            responses=[
                self.renderer.parse_response(completion.completion_tokens)
                for completion in sampled.completions
            ],
            prompt_row=self.data.rows[row],
            where=f"{self.data.source}:{self.data.line_numbers[row]}",
        )


class TrajectoryWriter:
    """Per-step trajectories: `<run_dir>/trajectories/step-<N>.jsonl`, one line per rollout
    (a replayed step rewrites its file with the same lines)."""

    def __init__(self, run_dir: str, data: RLData, renderer_decode: Callable[[list[int]], str]):
        self.dir, self.data, self.decode = f"{run_dir}/trajectories", data, renderer_decode

    def __call__(self, rollouts: StepRollouts) -> None:
        lines = []
        for group in rollouts.rows:
            row = self.data.train.rows[group.row]
            for rollout, advantage in zip(group.rollouts, group.advantages, strict=True):
                lines.append(
                    {
                        "step": rollouts.step,
                        "row": group.row,
                        "prompt": row.prompt[-1].content,
                        "completion": self.decode(rollout.tokens),
                        "reward": rollout.reward,
                        "advantage": advantage,
                        "completion_len": len(rollout.tokens),
                        "truncated": rollout.finish_reason == "length",
                        "accepted": group.accepted,
                        "snapshot": rollout.snapshot,
                        "ground_truth": row.ground_truth,
                    }
                )
        text = "".join(json.dumps(line) + "\n" for line in lines)
        with fsspec.open(f"{self.dir}/step-{rollouts.step:06d}.jsonl", "w", auto_mkdir=True) as f:
            f.write(text)
