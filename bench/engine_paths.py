"""Engine paths: tokens/s and peak memory of one training step, reference path vs fast paths.

Drives `TrainableModel` directly (no HTTP): forward_backward (cross-entropy) + optim_step on
the same batch for each engine path — `reference` (fp32, single-tensor AdamW, full
log-softmax, per-datum losses: the CPU default), `fast-fp32` (fused AdamW, chunked
log-softmax, batched losses) and `fast-bf16` (the same under bf16 autocast: the CUDA default).
Rounds are interleaved (A, B, C, A, B, C, ...) so machine noise hits every path alike; medians
are printed. Peak memory: CUDA's peak allocation, or on CPU the process's peak resident set
above its resident set before the round (Linux's VmHWM, reset per round). Measures only.

    .venv/bin/python bench/engine_paths.py                                  # tiny
    .venv/bin/python bench/engine_paths.py --models tiny,smollm2-135m --profile /tmp/prof
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from backend.models.store import ensure_model_dir
from backend.trainer.datum import Datum
from backend.trainer.engine import TrainableModel
from backend.trainer.settings import AdamSettings, EngineSettings

ADAM = AdamSettings(learning_rate=1e-5)
PATHS: dict[str, Callable[[], EngineSettings]] = {
    "reference": lambda: EngineSettings(
        autocast="off", optimizer="single_tensor", logprob_chunk=0, batched_losses=False
    ),
    "fast-fp32": lambda: EngineSettings.fast(autocast="off", logprob_chunk=64),
    "fast-bf16": lambda: EngineSettings.fast(autocast="bf16", logprob_chunk=64),
}


@dataclass(frozen=True)
class Shape:
    batch: int
    seq_len: int
    steps: int  # timed steps per round and path
    rounds: int


SHAPES = {
    "tiny": Shape(batch=16, seq_len=64, steps=5, rounds=3),
    "smollm2-135m": Shape(batch=2, seq_len=256, steps=1, rounds=3),
}


def make_datums(shape: Shape, vocab: int, seed: int = 0) -> list[Datum]:
    generator = torch.Generator().manual_seed(seed)
    datums = []
    for _ in range(shape.batch):
        ids = torch.randint(0, vocab, (shape.seq_len + 1,), generator=generator)
        inputs = {"target_tokens": ids[1:], "weights": torch.ones(shape.seq_len)}
        datums.append(Datum(tokens=ids[:-1].tolist(), loss_fn_inputs=inputs))
    return datums


def train_step(model: TrainableModel, datums: list[Datum]) -> float:
    result = model.forward_backward(datums, "cross_entropy", {})
    model.optim_step(ADAM, "num_loss_tokens")
    return result.metrics["loss:sum"]


class PeakMemory:
    """Peak memory above the start of a round, in MiB: CUDA allocations or CPU resident set."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"

    def start(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self._base = _proc_status_kib("VmRSS") * 1024

    def peak_mib(self) -> float:
        if self._cuda:
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self._base) / 2**20
        return (_proc_status_kib("VmHWM") * 1024 - self._base) / 2**20


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def profile_step(model: TrainableModel, datums: list[Datum], out: Path) -> None:
    """One step under the torch profiler: a Chrome trace and the top operators as text."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        train_step(model, datums)
    prof.export_chrome_trace(str(out.with_suffix(".json")))
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    out.with_suffix(".txt").write_text(table)


def measure(
    model_name: str, paths: list[str], device: str, data_dir: Path, profile: Path | None
) -> dict[str, dict[str, float]]:
    shape = SHAPES[model_name]
    model_dir = ensure_model_dir(model_name, data_dir)
    models = {
        path: TrainableModel(model_dir, base_model=model_name, device=device, engine=PATHS[path]())
        for path in paths
    }
    vocab = next(iter(models.values())).vocab_size
    datums = make_datums(shape, vocab)
    first_loss = {path: train_step(model, datums) for path, model in models.items()}  # warm-up
    memory = PeakMemory(torch.device(device))
    seconds: dict[str, list[float]] = {path: [] for path in paths}
    peaks: dict[str, list[float]] = {path: [] for path in paths}
    for _ in range(shape.rounds):
        for path, model in models.items():
            memory.start()
            started = time.perf_counter()
            for _ in range(shape.steps):
                train_step(model, datums)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds[path].append(time.perf_counter() - started)
            peaks[path].append(memory.peak_mib())
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
        for path, model in models.items():
            profile_step(model, datums, profile / f"{model_name}-{path}")
    tokens = shape.batch * shape.seq_len * shape.steps
    return {
        path: {
            "tokens_per_s": tokens / statistics.median(seconds[path]),
            "peak_mib": statistics.median(peaks[path]),
            "first_loss": first_loss[path],
        }
        for path in paths
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", default="tiny", help="comma-separated: tiny,smollm2-135m")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated engine paths")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--data-dir", type=Path, default=None, help="model cache (default: temp)")
    parser.add_argument("--profile", type=Path, default=None, help="write torch profiles here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    paths = args.paths.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or Path(tmp)
        print(f"device {args.device}, {args.threads} threads; load average {os.getloadavg()}")
        print(f"{'model':<14} {'path':<10} {'tokens/s':>10} {'peak MiB':>9} {'first loss':>11}")
        for model_name in args.models.split(","):
            results = measure(model_name, paths, args.device, data_dir, args.profile)
            for path, row in results.items():
                print(
                    f"{model_name:<14} {path:<10} {row['tokens_per_s']:>10.0f} "
                    f"{row['peak_mib']:>9.1f} {row['first_loss']:>11.3f}"
                )
    if args.profile is not None:
        print(f"profiles (Chrome traces + operator tables) in {args.profile}")


if __name__ == "__main__":
    main()
