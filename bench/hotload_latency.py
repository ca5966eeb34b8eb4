"""Hotload latency: save → verified serving, through the SDK as a training loop does it.

Per model and mode, a trainer job (`TrainerJobManager.create_and_wait`) and a deployment linked
to it (`hotLoadTrainerJob`) run on an in-process `LocalPlatform`. Each round trains one step
before every sync and calls `WeightSyncer.sync`: full-parameter rounds send a `base` and then
`--deltas` XOR deltas, LoRA rounds only adapters (always `base`); the next round starts a new
chain. The table gives median and max of the syncer's `SyncTiming` per kind: save, load (the
request until replica 0 serves it), verify (until every replica does), warmup, and save →
verified in all (with the syncer's deployment check at the start of a chain). `full` and `lora`
use short poll intervals and no warmup; `defaults` is a full-parameter chain through a
`WeightSyncer` built with its default settings, as a user calls it (5 s poll cap, warmup on).
The parity column is the largest gap between the deployment's echoed logprobs and the
trainer's `forward` after the last sync: a fast hotload must still serve the trainer's
weights. `--profile DIR` writes a py-spy profile (all threads: trainer, hotload loader, HTTP
server; waits included, since latency is the point; speedscope JSON, which speedscope.app
opens) of each model and mode, or a cProfile of the
calling thread where py-spy is not installed. Measures only; asserts nothing.

    .venv/bin/python bench/hotload_latency.py                       # tiny: full, LoRA, defaults
    .venv/bin/python bench/hotload_latency.py --models tiny,smollm2-135m --modes full
    .venv/bin/python bench/hotload_latency.py --models smollm2-135m --profile /tmp/hotload-prof

Base models come from the shared model cache (`--models-dir`, else `$FIRELOOP_MODEL_CACHE`, else
`~/.cache/fireloop/models`; the SmolLM2 conversion takes ~20 s, once), and each run's platform
state and snapshots live in a temporary directory that is removed after it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TINKER_TELEMETRY", "0")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # a "Loading weights" bar per load

import torch
from profiling import profiled  # bench/profiling.py, beside this script
from tinker import types

from backend import LocalPlatform, PlatformTimings
from backend.models.store import ensure_model_dir, resolve_models_dir
from sdk import (
    DeploymentConfig,
    DeploymentManager,
    DeploymentSampler,
    FiretitanServiceClient,
    TrainerJobConfig,
    TrainerJobManager,
    TrainerServiceEndpoint,
    WeightSyncer,
)

LORA_RANK = 16
ADAM = types.AdamParams(learning_rate=1e-4)
BATCH, SEQ_LEN = 2, 32  # one small training step between syncs: the weights must move
PARITY_TOKENS = 16  # the prompt echoed for the parity check


@dataclass(frozen=True)
class Sync:
    """One `WeightSyncer.sync`: its checkpoint kind and the syncer's timing, in seconds."""

    kind: str
    save_s: float
    load_s: float
    verify_s: float
    warmup_s: float
    total_s: float


@dataclass(frozen=True)
class Run:
    """Every sync of one model and mode, and the parity gap after the last one."""

    model: str
    mode: str
    syncs: list[Sync]
    parity_gap: float


class HotloadLoop:
    """A trainer job, a deployment attached to it, and the syncer between them."""

    def __init__(
        self, platform: LocalPlatform, model: str, lora_rank: int, poll_s: float, *, defaults: bool
    ) -> None:
        self._trainers = TrainerJobManager(api_key=platform.api_key, base_url=platform.base_url)
        self._deployments = DeploymentManager(api_key=platform.api_key, base_url=platform.base_url)
        base_model = f"fireloop/{model}"
        config = TrainerJobConfig(
            base_model=base_model, lora_rank=lora_rank, max_context_length=512
        )
        self._endpoint = self._trainers.create_and_wait(
            config, poll_interval_s=poll_s, timeout_s=300
        )
        self._service = FiretitanServiceClient(
            base_url=self._endpoint.base_url, api_key=platform.api_key
        )
        self.client = self._service.create_training_client(base_model, lora_rank=lora_rank, seed=0)
        self.deployment_id = f"hotload-{self._endpoint.job_id.rsplit('-', 1)[-1]}"
        self._deploy(base_model, self._endpoint, poll_s)
        if defaults:  # as a user builds it: every wait and the warmup at their defaults
            self.syncer = WeightSyncer(
                self.client, self._deployments, self.deployment_id, base_model=base_model
            )
        else:
            self.syncer = WeightSyncer(
                self.client,
                self._deployments,
                self.deployment_id,
                base_model=base_model,
                trainer_job_name=self._endpoint.job_name,
                warmup_after_hotload=False,  # the goal is save → verified; warmup is its own call
                hotload_poll_interval_s=poll_s,
                verify_poll_interval_s=poll_s,
            )
        self.sampler: DeploymentSampler = self._deployments.create_sampler(self.deployment_id)

    def _deploy(self, base_model: str, endpoint: TrainerServiceEndpoint, poll_s: float) -> None:
        config = DeploymentConfig(
            deployment_id=self.deployment_id,
            base_model=base_model,
            hot_load_trainer_job=endpoint.job_name,
            min_replica_count=1,
        )
        self._deployments.create_or_get(config)
        self._deployments.wait_for_ready(self.deployment_id, timeout_s=300, poll_interval_s=poll_s)

    def train_step(self, datums: list[types.Datum]) -> None:
        self.client.forward_backward(datums, "cross_entropy")
        self.client.optim_step(ADAM).result(timeout=600)

    def sync(self, name: str, checkpoint_type: str) -> Sync:
        timing = self.syncer.sync(name, checkpoint_type=checkpoint_type).timing
        return Sync(
            kind="adapter" if self.syncer.lora_rank else checkpoint_type,
            save_s=timing.save_s,
            load_s=timing.hotload_s,
            verify_s=timing.verify_s,
            warmup_s=timing.warmup_s,
            total_s=timing.total_s,
        )

    def close(self) -> None:
        self._service.close()
        self._deployments.delete(self.deployment_id)
        self._trainers.delete(self._endpoint.job_id)
        self._deployments.close()
        self._trainers.close()


def make_datums(vocab_size: int, seed: int = 0) -> list[types.Datum]:
    generator = torch.Generator().manual_seed(seed)
    tokens_BT1 = torch.randint(3, vocab_size - 3, (BATCH, SEQ_LEN + 1), generator=generator)
    return [datum(row.tolist()) for row in tokens_BT1]


def datum(tokens: list[int]) -> types.Datum:
    """Cross-entropy on every next token of `tokens`."""
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_torch(torch.tensor(tokens[1:])),
            "weights": types.TensorData.from_torch(torch.ones(len(tokens) - 1)),
        },
    )


def parity_gap(loop: HotloadLoop, prompt: list[int]) -> float:
    """max |served - trained| logprob over the prompt echoed plus one sampled token."""

    async def served() -> tuple[list[int], list[float]]:
        try:
            (sample,) = await loop.sampler.sample_with_prompt_tokens(
                prompt, max_tokens=1, echo=True
            )
        finally:
            await loop.sampler.aclose()
        assert sample.inference_logprobs is not None, "the deployment returned no logprobs"
        return sample.full_tokens, sample.inference_logprobs

    tokens, served_logprobs = asyncio.run(served())
    output = loop.client.forward([datum(tokens)], "cross_entropy").result(timeout=600)
    trained_T = torch.tensor(output.loss_fn_outputs[0]["logprobs"].data, dtype=torch.float64)
    served_T = torch.tensor(served_logprobs, dtype=torch.float64)
    return float((served_T - trained_T).abs().max())


def measure(
    platform: LocalPlatform, model: str, mode: str, rounds: int, deltas: int, poll_s: float
) -> Run:
    lora_rank = LORA_RANK if mode == "lora" else 0
    loop = HotloadLoop(platform, model, lora_rank, poll_s, defaults=mode == "defaults")
    config = json.loads((ensure_model_dir(model, platform.models_dir) / "config.json").read_text())
    datums = make_datums(vocab_size=int(config["vocab_size"]))
    syncs: list[Sync] = []
    try:
        for round_index in range(rounds):
            loop.syncer.reset_delta_chain()  # every round starts with a full load
            for sync_index in range(deltas + 1):
                loop.train_step(datums)
                kind = "delta" if sync_index and mode != "lora" else "base"
                syncs.append(loop.sync(f"r{round_index}-s{sync_index}", kind))
                done = syncs[-1]
                print(
                    f"  {model} {mode} {done.kind}: save {done.save_s:.2f} s, "
                    f"load {done.load_s:.2f} s, verify {done.verify_s:.2f} s, "
                    f"warmup {done.warmup_s:.2f} s, total {done.total_s:.2f} s",
                    flush=True,
                )
        prompt = list(datums[0].model_input.to_ints()[:PARITY_TOKENS])
        gap = parity_gap(loop, prompt)
    finally:
        loop.close()
    return Run(model, mode, syncs, gap)


def print_table(runs: list[Run]) -> None:
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    header = [
        "model",
        "mode",
        "kind",
        "n",
        "save s",
        "load s",
        "verify s",
        "warmup s",
        "save → verified s",
        "parity",
    ]
    print("| " + " | ".join(header) + " |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for run in runs:
        for kind in ("base", "delta", "adapter"):
            syncs = [s for s in run.syncs if s.kind == kind]
            if not syncs:
                continue
            cells = [
                _median_max([s.save_s for s in syncs]),
                _median_max([s.load_s for s in syncs]),
                _median_max([s.verify_s for s in syncs]),
                _median_max([s.warmup_s for s in syncs]),
                _median_max([s.total_s - s.warmup_s for s in syncs]),
            ]
            print(
                f"| {run.model} | {run.mode} | {kind} | {len(syncs)} | "
                + " | ".join(cells)
                + f" | {run.parity_gap:.1e} |"
            )
    print(
        "\ncells: median / max; save → verified excludes the warmup; "
        "parity: max |served - trainer| logprob after the last sync"
    )


def _median_max(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} / {max(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny", help="comma-separated: tiny,smollm2-135m")
    parser.add_argument(
        "--modes", default="full,lora,defaults", help="comma-separated: full,lora,defaults"
    )
    parser.add_argument("--rounds", type=int, default=3, help="chains per model and mode")
    parser.add_argument("--deltas", type=int, default=3, help="delta syncs after each base")
    parser.add_argument("--poll-s", type=float, default=0.02, help="hotload status poll interval")
    parser.add_argument("--models-dir", type=Path, default=None, help="model cache")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--profile", type=Path, default=None, help="write profiles into DIR")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models_dir = resolve_models_dir(args.models_dir)
    runs: list[Run] = []
    for model in args.models.split(","):
        ensure_model_dir(model, models_dir)  # build once, outside the timed platform
    with tempfile.TemporaryDirectory(prefix="hotload-bench-") as tmp:
        # The platform's own data directory is fresh; its model cache is the persistent one.
        timings = PlatformTimings(
            job_pending_s=0.01,
            job_creating_s=0.01,
            deployment_creating_s=0.01,
            deployment_updating_s=0.01,
        )
        with LocalPlatform(data_dir=tmp, models_dir=models_dir, timings=timings) as platform:
            for model in args.models.split(","):
                for mode in args.modes.split(","):
                    started = time.perf_counter()
                    with profiled(args.profile, f"hotload-{model}-{mode}", idle=True):
                        runs.append(
                            measure(platform, model, mode, args.rounds, args.deltas, args.poll_s)
                        )
                    print(f"done {model} {mode} in {time.perf_counter() - started:.0f} s")
    print_table(runs)


if __name__ == "__main__":
    main()
