"""Orchestration overhead: the SFT flow against the same loop written directly on the SDK.

Both sides run the README's main job (SFT of `tiny` on string reversal, demo settings) against
one local platform started here: provision a trainer job and a deployment, train, save
resumable state, hotload and verify, evaluate (eval loss and greedy exact match through the
deployment), delete both. The flow side is `sft_flow` as the CLI runs it, with everything it
adds: Prefect task and flow runs, the ledger, artifacts, control-plane read-backs. The bare
side is plain SDK calls in the same order (`Cadence` decides the points on both sides), so
equal losses prove both did the same work. Rounds are interleaved, alternating which side
goes first, after one warm-up round of each. Prints wall seconds, the ratio flow/bare, and
the task runs and artifacts the Prefect server recorded for the flow run (read back through the
client; also per 100 steps), and the CPU seconds per 100 steps of this process (flow or loop
and the in-process platform, split by thread) and of the Prefect server, flow against bare:
CPU time is what a loaded machine distorts least. `--profile DIR` writes a py-spy profile of
every thread of each timed side (cProfile of the calling thread where py-spy is missing).
Measures only; asserts nothing.

    .venv/bin/python bench/orchestration_overhead.py                   # 60 steps, 3 rounds
    .venv/bin/python bench/orchestration_overhead.py --steps 100 --rounds 5
    .venv/bin/python bench/orchestration_overhead.py --steps 100 --rounds 1 --profile /tmp/prof

Prefect: the API in `PREFECT_API_URL`, else Prefect's temporary local server (as for
`fireloop demo`); its start-up falls in the warm-up round.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

# Before Prefect, tinker and transformers are imported: nothing leaves the machine.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TINKER_TELEMETRY", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import psutil  # type: ignore[import-untyped]
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.settings import PREFECT_API_URL, temporary_settings
from profiling import profiled  # bench/profiling.py, beside this script
from pydantic import SecretStr
from transformers import AutoTokenizer

from algorithms.chat import ChatRenderer
from algorithms.datums import grad_normalization, mean_ce_loss
from algorithms.optimizer import OptimizerPlan
from backend import LocalPlatform
from flows.cadence import Cadence
from flows.config import PlatformConfig, SFTConfig
from flows.embedded import EMBEDDED_WAITS
from flows.sft import configured_sft_flow
from flows.sft_data import RenderedSFT, SFTBatches, SFTData, load_sft_data, render_sft_data
from sdk import (
    DeploymentConfig,
    DeploymentManager,
    DeploymentSampler,
    FiretitanServiceClient,
    TrainerJobConfig,
    TrainerJobManager,
    WeightSyncer,
)
from sdk.firetitan_training import FiretitanTrainingClient
from tasks.evaluation import greedy_completions  # a plain coroutine, no Prefect task

WAITS = EMBEDDED_WAITS  # what the flow uses on the embedded platform; the bare loop too


@dataclass(frozen=True)
class Outcome:
    """One side's run: wall seconds, the last training loss and final exact match."""

    wall_s: float
    final_loss: float
    exact_match: float
    task_runs: int | None = None
    artifacts: int | None = None  # artifact versions created (progress updates not counted)
    server_cpu_s: float = 0.0  # CPU seconds the temporary Prefect server spent meanwhile
    process_cpu_s: float = 0.0  # CPU seconds of this process (flow or loop, and the platform)
    thread_cpu_s: Counter[str] | None = None  # of process_cpu_s, by thread group


def thread_cpu_s() -> dict[int, float]:
    """CPU seconds (user + system) of every live thread of this process, by native id."""
    tick = os.sysconf("SC_CLK_TCK")
    seconds: dict[int, float] = {}
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):  # the thread ended meanwhile
            fields = (task / "stat").read_text().rpartition(")")[2].split()
            seconds[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return seconds


def thread_group(name: str | None) -> str:
    """A thread's name without its counter (`Thread-12 (worker)` → `Thread (worker)`);
    `native`: threads Python did not start (torch's intra-op pool)."""
    if name is None:
        return "native"
    return re.sub(r"[-_ ]?\d+", "", name)


@dataclass
class CpuMeter:
    """Process, per-thread-group and Prefect-server CPU seconds over a block."""

    process_s: float = 0.0
    server_s: float = 0.0
    threads: Counter[str] | None = None


@contextlib.contextmanager
def metered() -> Iterator[CpuMeter]:
    meter = CpuMeter()
    live = Path("/proc/self/task").is_dir()
    before = thread_cpu_s() if live else {}
    names_seen: dict[int, str] = {}
    process_before, server_before = time.process_time(), children_cpu_s()
    try:
        yield meter
    finally:
        meter.process_s = time.process_time() - process_before
        meter.server_s = children_cpu_s() - server_before
        if live:
            after = thread_cpu_s()
            names_seen = {t.native_id or 0: t.name for t in threading.enumerate()}
            spent: Counter[str] = Counter()
            for tid, seconds in after.items():
                spent[thread_group(names_seen.get(tid))] += seconds - before.get(tid, 0.0)
            # Threads that ended inside the block (task watchers, short-lived pools).
            spent["(ended threads)"] = max(0.0, meter.process_s - sum(spent.values()))
            meter.threads = spent


def children_cpu_s() -> float:
    """CPU seconds of this process's children: the temporary Prefect server, if any (not
    the py-spy recorder of `--profile`)."""
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "py-spy" in child.name():
                continue
            times = child.cpu_times()
            total += times.user + times.system
    return total


def make_config(run_dir: Path, platform: LocalPlatform, steps: int) -> SFTConfig:
    """The demo's SFT config (`fireloop demo`), on `platform`, deleting what it provisions."""
    return SFTConfig(
        run_name=run_dir.name,
        run_dir=str(run_dir),
        max_steps=steps,
        dataset="reverse",
        platform=PlatformConfig(base_url=platform.base_url, api_key=SecretStr(platform.api_key)),
        waits=WAITS,
        teardown="delete",
        flow_retries=0,
    )


# -- the flow side ----------------------------------------------------------------------------


def run_flow(config: SFTConfig, profile_dir: Path | None = None, name: str = "flow") -> Outcome:
    with profiled(profile_dir, name), metered() as cpu:
        started = time.perf_counter()
        state = configured_sft_flow(config)(config, return_state=True)
        wall_s = time.perf_counter() - started
    result = state.result()
    flow_run_id = state.state_details.flow_run_id
    metrics = result.final_metrics
    return Outcome(
        wall_s=wall_s,
        final_loss=metrics["train/ce_loss"],
        exact_match=metrics.get("eval/exact_match", float("nan")),
        task_runs=count_task_runs(flow_run_id) if flow_run_id else None,
        artifacts=count_artifacts(flow_run_id) if flow_run_id else None,
        server_cpu_s=cpu.server_s,
        process_cpu_s=cpu.process_s,
        thread_cpu_s=cpu.threads,
    )


def count_task_runs(flow_run_id: UUID, settle_s: float = 10.0) -> int:
    """Task runs the Prefect server recorded for the flow run (they arrive as events)."""
    flow_filter = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    deadline = time.monotonic() + settle_s
    count, previous = 0, -1
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline and count != previous:
            previous = count
            time.sleep(1.0)
            count = len(client.read_task_runs(flow_run_filter=flow_filter, limit=200))
    return count


def count_artifacts(flow_run_id: UUID) -> int:
    """Artifact versions the flow run created (a keyed artifact's every write is a version;
    in-place progress updates are not)."""
    artifact_filter = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    with get_client(sync_client=True) as client:
        return len(client.read_artifacts(artifact_filter=artifact_filter, limit=200))


# -- the bare side: the same loop on the SDK --------------------------------------------------


@dataclass
class BareRun:
    """The SDK objects of a bare run."""

    client: FiretitanTrainingClient
    syncer: WeightSyncer
    sampler: DeploymentSampler
    rendered: RenderedSFT


def run_bare(
    config: SFTConfig, platform: LocalPlatform, profile_dir: Path | None = None, name: str = "bare"
) -> Outcome:
    with profiled(profile_dir, name), metered() as cpu:
        started = time.perf_counter()
        loss, exact = bare_run(config, platform)
        wall_s = time.perf_counter() - started
    return Outcome(
        wall_s,
        loss,
        exact,
        server_cpu_s=cpu.server_s,
        process_cpu_s=cpu.process_s,
        thread_cpu_s=cpu.threads,
    )


def bare_run(config: SFTConfig, platform: LocalPlatform) -> tuple[float, float]:
    """Provision, train and evaluate with plain SDK calls, delete; the loss and exact match."""
    data = load_sft_data(config)
    key = platform.api_key
    job_id = f"{config.run_name}-trainer"
    deployment_id = f"{config.run_name}-deploy"
    trainers = TrainerJobManager(key, platform.base_url)
    deployments = DeploymentManager(key, platform.base_url)
    job_config = TrainerJobConfig(
        base_model=config.base_model, lora_rank=config.lora_rank, requested_job_id=job_id
    )
    created = trainers.create(job_config)
    deployment_config = DeploymentConfig(
        deployment_id=deployment_id,
        base_model=config.base_model,
        hot_load_trainer_job=created.job_name,
        min_replica_count=1,
        max_replica_count=1,
    )
    with ThreadPoolExecutor(2) as pool:  # the flow provisions both at once too
        ready_job = pool.submit(
            trainers.wait_for_ready,
            job_id,
            job_name=created.job_name,
            poll_interval_s=WAITS.poll_interval_s,
        )
        deployments.create_or_get(deployment_config)
        pool.submit(
            deployments.wait_for_ready, deployment_id, poll_interval_s=WAITS.poll_interval_s
        ).result()
        endpoint = ready_job.result()
    service = FiretitanServiceClient(endpoint.base_url, key)
    try:
        return train_bare(config, service, deployments, deployment_id, data)
    finally:
        service.close()
        trainers.delete(job_id)
        deployments.delete(deployment_id)
        trainers.close()
        deployments.close()


def train_bare(
    config: SFTConfig,
    service: FiretitanServiceClient,
    deployments: DeploymentManager,
    deployment_id: str,
    data: SFTData,
) -> tuple[float, float]:
    """Train, checkpoint, hotload and evaluate at the flow's cadence points."""
    client = service.create_training_client(
        config.base_model,
        lora_rank=config.lora_rank,
        seed=config.seed,
        lora_alpha=config.lora_alpha,
    )
    tokenizer_id = client.get_info().model_data.tokenizer_id or config.base_model
    renderer = ChatRenderer(AutoTokenizer.from_pretrained(tokenizer_id))
    rendered = render_sft_data(data, renderer, config)
    syncer = WeightSyncer(
        policy_client=client,
        deploy_mgr=deployments,
        deployment_id=deployment_id,
        base_model=config.base_model,
        hotload_poll_interval_s=WAITS.poll_interval_s,
        verify_poll_interval_s=WAITS.poll_interval_s,
        warmup_retry_interval_s=WAITS.poll_interval_s,
    )
    run = BareRun(client, syncer, deployments.create_sampler(deployment_id), rendered)
    cadence = Cadence(
        max_steps=config.max_steps,
        checkpoint_every=config.checkpoint_every,
        hotload_every=config.hotload_every,
        eval_every=config.eval_every,
        has_deployment=True,
        sample_eval=config.sample_eval,
    )
    plan = OptimizerPlan(
        peak_lr=config.learning_rate,
        total_steps=config.max_steps,
        adam=config.adam,
        grad_normalization=grad_normalization(config.loss_reduction),
    )
    batches = SFTBatches(rendered.train, config)
    exact = evaluate_bare(run, config, 0)
    cursor, loss = 0, float("nan")
    for step in range(config.max_steps):
        sourced = batches.batch(cursor)
        datums = list(sourced.data.datums)
        fwd_bwd = client.forward_backward(datums, "cross_entropy")
        optim = client.optim_step(
            plan.adam_params(step), grad_accumulation_normalization=plan.grad_normalization
        )
        loss = mean_ce_loss(fwd_bwd.result().metrics["loss:sum"], datums)
        optim.result()
        cursor, point = sourced.cursor_after, step + 1
        # The flow's order: the segment's save, then the hotload, then the evaluation.
        if cadence.checkpoint_at(point):
            client.save_state(f"step-{point}", timeout=WAITS.save_timeout_s)
        if cadence.hotload_at(point, eval_due=cadence.eval_at(point)):
            sync_bare(run, point)
        if cadence.eval_at(point):
            exact = evaluate_bare(run, config, point)
    return loss, exact


def sync_bare(run: BareRun, point: int) -> None:
    run.syncer.sync(f"step-{point}")  # the syncer picks base (its first) or delta, as the flow's


def evaluate_bare(run: BareRun, config: SFTConfig, point: int) -> float:
    """Eval loss by a forward pass, exact match of greedy samples (hotloaded first at 0)."""
    datums = run.rendered.eval_datums
    run.client.forward(datums, "cross_entropy").result()
    if point == 0:
        sync_bare(run, point)
    prompts = run.rendered.eval_prompts
    completions = asyncio.run(
        greedy_completions(run.sampler, prompts, config.eval_max_tokens, WAITS.sample_timeout_s)
    )
    return run.rendered.exact_match(completions)


# -- the comparison ---------------------------------------------------------------------------


def run_round(
    index: int,
    flow_first: bool,
    root: Path,
    platform: LocalPlatform,
    steps: int,
    profile_dir: Path | None = None,
) -> tuple[Outcome, Outcome]:
    flow_config = make_config(root / f"flow-{index}", platform, steps)
    bare_config = make_config(root / f"bare-{index}", platform, steps)
    flow_name, bare_name = f"flow-round-{index}", f"bare-round-{index}"
    if flow_first:
        flow = run_flow(flow_config, profile_dir, flow_name)
        return flow, run_bare(bare_config, platform, profile_dir, bare_name)
    bare = run_bare(bare_config, platform, profile_dir, bare_name)
    return run_flow(flow_config, profile_dir, flow_name), bare


def report(rounds: list[tuple[Outcome, Outcome]], steps: int) -> None:
    print(
        f"{'round':>5} {'flow s':>8} {'bare s':>8} {'ratio':>7} {'task runs':>9} "
        f"{'runs/s':>7} {'server cpu s':>13} {'same loss':>9} {'exact (flow/bare)':>18} "
        f"{'artifacts':>9}"
    )
    for index, (flow, bare) in enumerate(rounds, start=1):
        runs = flow.task_runs if flow.task_runs is not None else 0
        print(
            f"{index:>5} {flow.wall_s:>8.2f} {bare.wall_s:>8.2f} {flow.wall_s / bare.wall_s:>7.3f} "
            f"{runs:>9} {runs / flow.wall_s:>7.2f} "
            f"{f'{flow.server_cpu_s:.2f}/{bare.server_cpu_s:.2f}':>13} "
            f"{flow.final_loss == bare.final_loss!s:>9} "
            f"{flow.exact_match:>8.3f}/{bare.exact_match:<8.3f} "
            f"{flow.artifacts if flow.artifacts is not None else 0:>9}"
        )
    runs = statistics.median(flow.task_runs or 0 for flow, _ in rounds)
    artifacts = statistics.median(flow.artifacts or 0 for flow, _ in rounds)
    print(
        f"per 100 steps: {100 * runs / steps:.1f} task runs, {100 * artifacts / steps:.1f} "
        f"artifact versions (median of rounds: {runs:g} task runs, {artifacts:g} artifacts "
        f"in {steps} steps)"
    )
    flow_s = statistics.median(flow.wall_s for flow, _ in rounds)
    bare_s = statistics.median(bare.wall_s for _, bare in rounds)
    ratios = [flow.wall_s / bare.wall_s for flow, bare in rounds]
    print(
        f"median: flow {flow_s:.2f} s, bare {bare_s:.2f} s, overhead "
        f"{100 * (flow_s / bare_s - 1):+.1f} % (ratio of medians {flow_s / bare_s:.3f}; "
        f"per-round ratios {min(ratios):.3f}–{max(ratios):.3f})"
    )
    print_cpu(rounds, steps)


def print_cpu(rounds: list[tuple[Outcome, Outcome]], steps: int) -> None:
    """CPU seconds per 100 steps (medians of rounds): this process, each thread group, and the
    Prefect server; the flow's extra CPU is what a loaded machine distorts least."""
    per_100 = 100 / steps

    def median(values: Callable[[Outcome], float], side: int) -> float:
        return per_100 * statistics.median(values(pair[side]) for pair in rounds)

    print(f"\nCPU s per 100 steps (median of rounds; load {os.getloadavg()[0]:.2f}):")
    print(f"{'':>28} {'flow':>8} {'bare':>8} {'extra':>8}")
    rows: list[tuple[str, Callable[[Outcome], float]]] = [
        ("process (flow/loop+platform)", lambda o: o.process_cpu_s),
        ("Prefect server", lambda o: o.server_cpu_s),
    ]
    groups = sorted(
        {g for pair in rounds for o in pair for g in (o.thread_cpu_s or {})},
        key=lambda g: -median(lambda o: (o.thread_cpu_s or Counter())[g], 0),
    )
    rows += [(f"  {g}", lambda o, g=g: (o.thread_cpu_s or Counter())[g]) for g in groups]
    for label, value in rows:
        flow, bare = median(value, 0), median(value, 1)
        print(f"{label[:28]:>28} {flow:>8.2f} {bare:>8.2f} {flow - bare:>+8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after a warm-up)")
    parser.add_argument(
        "--warmup-steps", type=int, default=None, help="steps of the warm-up round (--steps)"
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="platform data (model cache)")
    parser.add_argument(
        "--heartbeats",
        choices=("auto", "on", "off"),
        default="auto",
        help="flow-run heartbeats (their thread's join costs a sync flow up to ~1 s); auto: as "
        "`fireloop run` sets them, off with the temporary server, Prefect's default with "
        "PREFECT_API_URL",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="write a py-spy profile (every thread) of each timed side to DIR",
    )
    args = parser.parse_args()
    watched = bool(os.environ.get("PREFECT_API_URL"))
    heartbeats = args.heartbeats == "on" or (args.heartbeats == "auto" and watched)
    with (
        tempfile.TemporaryDirectory(prefix="fireloop-overhead-") as tmp,
        temporary_settings(updates={} if heartbeats else {"flows.heartbeat_frequency": None}),
    ):
        root = Path(tmp)
        data_dir = args.data_dir or root / "platform"
        with LocalPlatform(data_dir=data_dir) as platform:
            print(
                f"Prefect API: {PREFECT_API_URL.value() or 'temporary local server'}; "
                f"platform {platform.base_url}; tiny, {args.steps} steps per run; "
                f"heartbeats {'on' if heartbeats else 'off'}"
            )
            warmup_steps = args.warmup_steps or args.steps
            warm_flow, warm_bare = run_round(0, True, root, platform, warmup_steps)
            print(f"warm-up: flow {warm_flow.wall_s:.2f} s, bare {warm_bare.wall_s:.2f} s")
            rounds = [
                run_round(i, i % 2 == 0, root, platform, args.steps, args.profile)
                for i in range(1, args.rounds + 1)
            ]
    report(rounds, args.steps)


if __name__ == "__main__":
    main()
