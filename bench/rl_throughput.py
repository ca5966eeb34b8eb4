"""RL throughput: synchronous RL against async RL (1 and 2 versions off-policy), same seeds.

One embedded platform started here. Per model, one SFT warm start on `addition` (as
`fireloop demo rl` does: RL on a random-init model earns no reward), then the RL flow from its
checkpoint in each mode — sync (max_offpolicy_versions 0), async O=1, async O=2 — interleaved
round by round (sync, O1, O2, sync, O1, O2, ...) so drift on the machine hits every mode alike.
Round r uses seed `--seed + r` in every mode. Steps/s is timed between the first and the last
optimizer step the flow reports (its progress hook), so provisioning, the first base hotload
and the first step's sampling are left out; the final save is also out (it follows the last
step). Rewards, overlap, trainer wait and realised staleness are read from each run's
metrics.jsonl ("n/a" where a mode does not log them). Prints a markdown table and writes every
curve to a JSON file. Measures only; asserts nothing.

    .venv/bin/python bench/rl_throughput.py --rounds 3 --steps 40                  # tiny
    .venv/bin/python bench/rl_throughput.py --model smollm2-135m --lora-rank 16 --steps 16
    .venv/bin/python bench/rl_throughput.py --rounds 1 --modes sync --profile /tmp/rl-prof

`--profile DIR` writes a py-spy profile of every thread of each RL run (speedscope JSON; the
flow's provisioning and teardown included; cProfile of the calling thread without py-spy).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

# Before Prefect, tinker and transformers are imported: nothing leaves the machine.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TINKER_TELEMETRY", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch
from prefect.settings import PREFECT_API_URL
from profiling import profiled  # bench/profiling.py, beside this script
from pydantic import BaseModel

from fireloop.run_cli import flow_heartbeats
from flows.config import PlatformConfig, RLConfig, SFTConfig
from flows.embedded import embedded_endpoint
from flows.monitoring import Progress
from flows.rl import run_rl
from flows.rl_demo import RLDemoConfig, rl_demo_configs
from flows.sft import configured_sft_flow

MODES = {"sync": 0, "async-O1": 1, "async-O2": 2}  # name → max_offpolicy_versions
FINAL_STEPS = 10  # the final reward is the mean raw reward of this many last steps
C = TypeVar("C", bound=BaseModel)
LOOP_METRIC_PREFIXES = ("perf/", "async/", "producer/")
SAMPLING_RETRY_LOGGER = "sdk._sampling_retry"  # one warning per retried completion
ASYNC_METRICS = (
    "perf/overlap_ratio",
    "perf/trainer_wait_for_sampler_time",
    "async/version_offset_mean",
    "async/version_offset_max",
)


@dataclass
class RunOutcome:
    """One RL run of one mode in one round: its timing and its per-step metric curves."""

    mode: str
    round: int
    seed: int
    steps: int
    steps_per_s: float  # (steps - 1) / seconds between the first and the last step reported
    total_wall_s: float  # the whole flow, provisioning and teardown included
    step_wall_s: list[float]  # perf/step_wall_time per step: the trainer side of a step
    reward: list[float | None]  # rollout/raw_reward per step (None: the step logged none)
    skipped_steps: int  # steps with nothing to train (every group's rewards equal)
    sampling_retries: int  # completions the SDK retried (a deployment mid-hotload answers 425)
    loop_metrics: dict[str, list[float]] = field(default_factory=dict)  # perf/, async/, producer/

    @property
    def final_reward(self) -> float | None:
        return mean_or_none(self.reward[-reward_window(self.steps) :])

    @property
    def first_reward(self) -> float | None:
        return mean_or_none(self.reward[: reward_window(self.steps)])


def reward_window(steps: int) -> int:
    """Steps averaged for the first and the final reward: 10, or half a shorter run, so the
    two never share a step."""
    return max(1, min(FINAL_STEPS, steps // 2))


class RetryCounter(logging.Filter):
    """Counts the SDK's sampling retries while in use, and keeps their log lines off the
    table (an async producer meets every hotload, so there are hundreds)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        self.count += 1
        return False

    def __enter__(self) -> RetryCounter:
        logging.getLogger(SAMPLING_RETRY_LOGGER).addFilter(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger(SAMPLING_RETRY_LOGGER).removeFilter(self)


def mean_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def revalidated(config: C, **changes: Any) -> C:
    """`config` with `changes`, validated again (model_copy would skip the validators)."""
    return type(config).model_validate({**config.model_dump(), **changes})


def warm_start_configs(
    args: argparse.Namespace, root: Path, platform: PlatformConfig
) -> tuple[SFTConfig, RLConfig]:
    """The RL demo's SFT and RL settings, on `args.model`, deleting what each run provisions."""
    demo = RLDemoConfig(name="bench", runs_dir=str(root), sft_steps=args.sft_steps)
    sft, rl = rl_demo_configs(demo, platform)
    model = {"base_model": args.model, "lora_rank": args.lora_rank, "teardown": "delete"}
    sft = revalidated(sft, flow_retries=0, **model)
    # One save at the end and no held-out evaluation: the loop between them is what is timed.
    rl = revalidated(rl, checkpoint_every=args.steps, eval_every=0, flow_retries=0, **model)
    return sft, rl


def run_sft(sft: SFTConfig) -> str:
    """The warm start, once per model: `<trainer job>:<checkpoint>` for every RL run."""
    started = time.perf_counter()
    result = configured_sft_flow(sft)(sft)
    print(
        f"SFT warm start: {result.steps_done} steps in {time.perf_counter() - started:.1f} s, "
        f"train/ce_loss {result.final_metrics.get('train/ce_loss', float('nan')):.3f}"
    )
    return f"{result.trainer_job_id}:{result.last_checkpoint}"


def run_mode(
    base: RLConfig,
    root: Path,
    mode: str,
    round_index: int,
    seed: int,
    steps: int,
    profile_dir: Path | None = None,
) -> RunOutcome:
    name = f"rl-{MODES[mode]}-{round_index}"
    config = revalidated(
        base,
        run_name=name,
        run_dir=str(root / name),
        seed=seed,
        max_steps=steps,
        max_offpolicy_versions=MODES[mode],
    )
    stamps: list[float] = []

    def on_progress(progress: Progress) -> None:
        stamps.append(time.monotonic())

    started = time.monotonic()
    with RetryCounter() as retries, profiled(profile_dir, f"{mode}-round-{round_index}"):
        result = run_rl(config, on_progress=on_progress)
    total_wall_s = time.monotonic() - started
    rows = [json.loads(line) for line in Path(result.metrics_path).read_text().splitlines()]
    span = stamps[-1] - stamps[0] if len(stamps) > 1 else float("nan")
    return RunOutcome(
        mode=mode,
        round=round_index,
        seed=seed,
        steps=len(rows),
        steps_per_s=(len(stamps) - 1) / span,
        total_wall_s=total_wall_s,
        step_wall_s=[row["perf/step_wall_time"] for row in rows if "perf/step_wall_time" in row],
        reward=[row.get("rollout/raw_reward") for row in rows],
        skipped_steps=sum(1 for row in rows if row.get("train/skipped_step")),
        sampling_retries=retries.count,
        loop_metrics={
            name: [row[name] for row in rows if name in row]
            for name in sorted({k for row in rows for k in row})
            if name.startswith(LOOP_METRIC_PREFIXES)
        },
    )


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def spread(values: list[float], spec: str = ".3f") -> str:
    """Median, with the range over rounds when there are several."""
    if not values:
        return "n/a"
    middle = format(statistics.median(values), spec)
    if len(values) == 1:
        return middle
    return f"{middle} ({format(min(values), spec)}–{format(max(values), spec)})"


def metric_summary(runs: list[RunOutcome], name: str) -> str:
    """Mean over the steps of each run, then median over runs; max for the maximum offset."""
    per_run = [r.loop_metrics[name] for r in runs if name in r.loop_metrics]
    if not per_run:
        return "n/a"
    pick = max if name.endswith("_max") else statistics.fmean
    return spread([float(pick(values)) for values in per_run], ".2f")


def report(model: str, runs: list[RunOutcome]) -> None:
    window = reward_window(min(r.steps for r in runs))
    print(
        f"\n{model}: steps/s between the first and last step reported (median over rounds, "
        f"range); final reward = mean rollout/raw_reward of the last {window} steps"
    )
    header = [
        "mode",
        "rounds",
        "steps",
        "steps/s",
        "× sync",
        "trainer s/step",
        f"reward first {window}",
        "final reward",
        "overlap ratio",
        "trainer wait s",
        "staleness mean",
        "staleness max",
    ]
    print("| " + " | ".join(header) + " |")
    print("|---|---:|---:|" + "---:|" * (len(header) - 3))
    sync_rate = statistics.median(r.steps_per_s for r in runs if r.mode == "sync")
    for mode in MODES:
        of_mode = [r for r in runs if r.mode == mode]
        if not of_mode:
            continue
        rate = statistics.median(r.steps_per_s for r in of_mode)
        cells = [
            mode,
            str(len(of_mode)),
            str(of_mode[0].steps),
            spread([r.steps_per_s for r in of_mode], ".2f"),
            f"{rate / sync_rate:.2f}",
            spread([statistics.fmean(r.step_wall_s) for r in of_mode if r.step_wall_s], ".2f"),
            spread([v for r in of_mode if (v := r.first_reward) is not None]),
            spread([v for r in of_mode if (v := r.final_reward) is not None]),
            *(metric_summary(of_mode, name) for name in ASYNC_METRICS),
        ]
        print("| " + " | ".join(cells) + " |")
    print_breakdown(runs)
    print_curves(runs)


BREAKDOWN = {  # column → metric, each a per-step mean
    "fwd_bwd s": "perf/fwd_bwd_time",
    "optim_step s": "perf/optim_step_time",
    "weight sync s": "perf/weight_sync_time",
    "hotload s": "perf/hotload_time",
    "rollout tokens/s": "perf/rollout_tokens_per_s",
}


def print_breakdown(runs: list[RunOutcome]) -> None:
    """Where a step's time goes: the trainer's calls, the weight sync, the sampler's rate."""
    print(
        "\nper-step means over the steps that report them (median over rounds); skipped "
        "steps: nothing to train; sampling retries: completions retried, per run"
    )
    print("| mode | " + " | ".join(BREAKDOWN) + " | skipped steps | sampling retries |")
    print("|---|" + "---:|" * (len(BREAKDOWN) + 2))
    for mode in MODES:
        of_mode = [r for r in runs if r.mode == mode]
        if of_mode:
            cells = [metric_summary(of_mode, name) for name in BREAKDOWN.values()]
            retries = spread([float(r.sampling_retries) for r in of_mode], ".0f")
            skipped = spread([float(r.skipped_steps) for r in of_mode], ".0f")
            print(f"| {mode} | " + " | ".join(cells) + f" | {skipped} | {retries} |")


def print_curves(runs: list[RunOutcome], bucket: int = 5) -> None:
    """The reward curve of each mode: mean raw reward per `bucket` steps, over its rounds."""
    print(f"\nreward curve (mean rollout/raw_reward per {bucket} steps, over rounds)")
    for mode in MODES:
        of_mode = [r for r in runs if r.mode == mode]
        if not of_mode:
            continue
        steps = min(len(r.reward) for r in of_mode)
        points = [
            mean_or_none([r for run in of_mode for r in run.reward[start : start + bucket]])
            for start in range(0, steps, bucket)
        ]
        print(f"  {mode:>10}: " + " ".join(fmt(p, ".2f") for p in points))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fireloop/tiny", help="a base model: fireloop models")
    parser.add_argument("--steps", type=int, default=20, help="RL steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every mode")
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated, of: " + ", ".join(MODES)
    )
    parser.add_argument("--sft-steps", type=int, default=15, help="SFT warm-start steps")
    parser.add_argument("--lora-rank", type=int, default=0, help="0: full-parameter (both runs)")
    parser.add_argument("--seed", type=int, default=0, help="round r runs seed + r in every mode")
    parser.add_argument(
        "--threads", type=int, help="torch threads, trainer and sampler alike (default: torch's)"
    )
    parser.add_argument("--data-dir", type=Path, help="the platform's data (default: a temp dir)")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="write a py-spy profile (every thread) of each RL run to DIR",
    )
    parser.add_argument(
        "--json", type=Path, default=Path("runs/bench/rl_throughput.json"), help="results file"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = [m.strip() for m in args.modes.split(",")]
    unknown = [m for m in modes if m not in MODES]
    if unknown or "sync" not in modes:
        parser.error(f"--modes: {unknown or modes} (sync is required, the ratios are against it)")
    # Heartbeats as `fireloop run` sets them: off under the temporary server (a sync flow
    # joins their thread, up to a second, at its end), Prefect's default with PREFECT_API_URL.
    with (
        tempfile.TemporaryDirectory(prefix="fl-bench-rl-") as tmp,
        flow_heartbeats(watched=bool(os.environ.get("PREFECT_API_URL"))),
    ):
        root = Path(tmp)
        endpoint = embedded_endpoint((args.data_dir or root / "platform").absolute())
        platform = PlatformConfig(base_url=endpoint.base_url, api_key=endpoint.api_key)
        print(
            f"Prefect API: {PREFECT_API_URL.value() or 'temporary local server'}; platform "
            f"{endpoint.base_url}; {args.model}, {args.steps} RL steps × {args.rounds} rounds; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
        )
        sft, rl = warm_start_configs(args, root, platform)
        rl = revalidated(rl, init_from_checkpoint=run_sft(sft))
        runs: list[RunOutcome] = []
        for round_index in range(args.rounds):
            for mode in modes:
                seed = args.seed + round_index
                run = run_mode(rl, root, mode, round_index, seed, args.steps, args.profile)
                runs.append(run)
                print(
                    f"round {round_index} {mode}: {run.steps_per_s:.2f} steps/s, "
                    f"final reward {fmt(run.final_reward)}, flow {run.total_wall_s:.1f} s"
                )
    report(args.model, runs)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results = {"settings": settings, "runs": [asdict(r) for r in runs]}
    args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(f"\nresults: {args.json}")


if __name__ == "__main__":
    main()
