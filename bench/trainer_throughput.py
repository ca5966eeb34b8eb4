"""Trainer throughput: the local trainer driven through the SDK vs a plain PyTorch loop.

Both sides run the same math on the same model, batch and step count: forward, fp32
log-softmax, summed cross-entropy, backward, AdamW. The SDK side goes through everything a
pipeline pays for — FiretitanTrainingClient, tinker's JSON wire, the gateway, futures, the
sequencer and the trainer's worker thread; the plain side is transformers + torch.optim in
this process. Rounds are interleaved so machine noise hits both alike. Prints a table and the
ratio SDK/plain (goal ≥ 0.9), and the CPU seconds each thread of this process spent per step on
the SDK side (trainer worker, HTTP server, tinker's client loop), which a loaded machine disturbs
far less than wall time. `--profile DIR` records the SDK side with py-spy (every thread;
speedscope JSON, open it at speedscope.app), or cProfile of the calling thread where py-spy is
missing. Measures only; asserts nothing.

    .venv/bin/python bench/trainer_throughput.py                       # tiny, full + LoRA
    .venv/bin/python bench/trainer_throughput.py --depths 1,2          # steps in flight
    .venv/bin/python bench/trainer_throughput.py --models tiny,smollm2-135m
    .venv/bin/python bench/trainer_throughput.py --profile /tmp/trainer-prof
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TINKER_TELEMETRY", "0")

import torch
from peft import LoraConfig, get_peft_model
from profiling import profiled  # bench/profiling.py, beside this script
from tinker import types
from transformers import AutoModelForCausalLM

from backend import LocalPlatform, PlatformTimings
from backend.models.store import ensure_model_dir
from sdk import FiretitanServiceClient, TrainerJobConfig, TrainerJobManager

LORA_RANK = 16
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAM = {"learning_rate": 1e-4, "beta1": 0.9, "beta2": 0.95, "eps": 1e-12, "weight_decay": 0.0}


@dataclass(frozen=True)
class Shape:
    batch: int
    seq_len: int
    steps: int  # timed steps per round and side
    rounds: int


SHAPES = {
    "tiny": Shape(batch=16, seq_len=64, steps=20, rounds=3),
    "smollm2-135m": Shape(batch=4, seq_len=128, steps=2, rounds=2),
}


def make_batch(shape: Shape, vocab: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab - 3, (shape.batch, shape.seq_len + 1), generator=generator)


class SdkTrainer:
    """The same training step through the SDK against a trainer job of the local platform."""

    def __init__(
        self, platform: LocalPlatform, model: str, lora_rank: int, tokens_BT1: torch.Tensor
    ) -> None:
        self._trainers = TrainerJobManager(api_key=platform.api_key, base_url=platform.base_url)
        config = TrainerJobConfig(
            base_model=f"fireloop/{model}", lora_rank=lora_rank, max_context_length=512
        )
        self._endpoint = self._trainers.create_and_wait(config, poll_interval_s=0.05, timeout_s=120)
        self._service = FiretitanServiceClient(
            base_url=self._endpoint.base_url, api_key=platform.api_key
        )
        self._client = self._service.create_training_client(
            f"fireloop/{model}", lora_rank=lora_rank, seed=0
        )
        self._datums = [
            types.Datum(
                model_input=types.ModelInput.from_ints(row[:-1].tolist()),
                loss_fn_inputs={
                    "target_tokens": types.TensorData.from_torch(row[1:].clone()),
                    "weights": types.TensorData.from_torch(torch.ones(row.numel() - 1)),
                },
            )
            for row in tokens_BT1
        ]
        self._adam = types.AdamParams(**ADAM)

    def run(self, steps: int, depth: int) -> list[float]:
        """`steps` optimizer steps with up to `depth` steps in flight; their losses.

        depth 1 submits forward_backward and optim_step together and waits for both (the
        tinker-cookbook pattern); depth 2 also submits the next step before waiting, so the
        trainer never idles while results travel back.
        """
        in_flight: deque[tuple[Any, Any]] = deque()
        losses: list[float] = []
        for _ in range(steps):
            fwd_bwd_future = self._client.forward_backward(self._datums, "cross_entropy")
            in_flight.append((fwd_bwd_future, self._client.optim_step(self._adam)))
            while len(in_flight) >= depth or (in_flight and len(losses) + len(in_flight) == steps):
                fwd_bwd, optim = in_flight.popleft()
                losses.append(float(fwd_bwd.result(timeout=600).metrics["loss:sum"]))
                optim.result(timeout=600)
        return losses

    def close(self) -> None:
        self._service.close()
        self._trainers.delete(self._endpoint.job_id)
        self._trainers.close()


def plain_step_fn(model_dir: Path, lora_rank: int, tokens_BT1: torch.Tensor) -> Callable[[], float]:
    """The same step written directly on transformers + torch."""
    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if lora_rank > 0:
        config = LoraConfig(r=lora_rank, lora_alpha=32, target_modules=LORA_TARGETS)
        model = get_peft_model(model, config)
    model.eval()  # no dropout: the trainer runs in eval mode as well
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=ADAM["learning_rate"],
        betas=(ADAM["beta1"], ADAM["beta2"]),
        eps=ADAM["eps"],
        weight_decay=ADAM["weight_decay"],
    )
    inputs_BT, targets_BT = tokens_BT1[:, :-1], tokens_BT1[:, 1:]

    def step() -> float:
        logits_BTV = model(input_ids=inputs_BT).logits
        logprobs_BT = torch.log_softmax(logits_BTV.float(), dim=-1)
        target_lp_BT = logprobs_BT.gather(-1, targets_BT.unsqueeze(-1)).squeeze(-1)
        loss = -target_lp_BT.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step


def timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def thread_cpu_s() -> dict[int, float]:
    """CPU seconds (user + system) of every thread of this process, by native thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    seconds: dict[int, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat.rpartition(")")[2].split()
        seconds[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return seconds


def thread_role(name: str | None) -> str:
    """Which part of the SDK path a thread belongs to; `native`: threads Python did not start
    (torch's intra-op pool, which helps whichever thread computes)."""
    if name is None:
        return "native"
    if name.startswith("trainer-"):
        return "trainer"
    if name == "fireloop-platform" or name.startswith("AnyIO"):
        return "server"
    if name.startswith("Thread-") and "background_thread" in name:
        return "client loop"
    if name == "MainThread":
        return "caller"
    return "other"


def cpu_by_role(run: Callable[[], float]) -> tuple[float, Counter[str]]:
    """`run()`, and the CPU seconds each role's threads spent meanwhile (Linux only)."""
    if not Path("/proc/self/task").is_dir():
        return run(), Counter()
    before = thread_cpu_s()
    value = run()
    after = thread_cpu_s()
    names = {t.native_id: t.name for t in threading.enumerate()}
    spent: Counter[str] = Counter()
    for tid, seconds in after.items():
        spent[thread_role(names.get(tid))] += seconds - before.get(tid, 0.0)
    return value, spent


def measure(
    model: str,
    lora_rank: int,
    depth: int,
    data_dir: Path,
    platform: LocalPlatform,
    profile_dir: Path | None = None,
) -> dict[str, float]:
    shape = SHAPES[model]
    model_dir = ensure_model_dir(model, data_dir)
    vocab = int(AutoModelForCausalLM.from_pretrained(model_dir).config.vocab_size)
    tokens_BT1 = make_batch(shape, vocab)
    sdk = SdkTrainer(platform, model, lora_rank, tokens_BT1)
    plain_step = plain_step_fn(model_dir, lora_rank, tokens_BT1)
    first_sdk, first_plain = sdk.run(1, 1)[0], plain_step()  # warm-up, and a same-math check
    sdk_s: list[float] = []
    plain_s: list[float] = []
    sdk_cpu: Counter[str] = Counter()
    for _ in range(shape.rounds):
        elapsed, spent = cpu_by_role(lambda: timed(lambda: sdk.run(shape.steps, depth)))
        sdk_s.append(elapsed)
        sdk_cpu += spent
        plain_s.append(timed(lambda: [plain_step() for _ in range(shape.steps)]))
    _, plain_cpu = cpu_by_role(lambda: timed(lambda: [plain_step() for _ in range(shape.steps)]))
    mode = f"lora{lora_rank}" if lora_rank else "full"
    with profiled(profile_dir, f"trainer-{model}-{mode}-depth{depth}", rate=250):
        sdk.run(shape.steps, depth)
    sdk.close()
    tokens = shape.batch * shape.seq_len * shape.steps
    sdk_tps = tokens / statistics.median(sdk_s)
    plain_tps = tokens / statistics.median(plain_s)
    sdk_steps = shape.steps * shape.rounds
    per_step_ms = {f"cpu_{role}": 1000 * sec / sdk_steps for role, sec in sdk_cpu.items()}
    return {
        "sdk_tps": sdk_tps,
        "plain_tps": plain_tps,
        "ratio": sdk_tps / plain_tps,
        "first_loss_sdk": first_sdk,
        "first_loss_plain": first_plain,
        "cpu_plain": 1000 * sum(plain_cpu.values()) / shape.steps,
        **per_step_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny", help="comma-separated: tiny,smollm2-135m")
    parser.add_argument("--modes", default="full,lora", help="comma-separated: full,lora")
    parser.add_argument("--depths", default="1", help="steps in flight on the SDK side: 1,2")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--profile", type=Path, default=None, help="write a profile of each SDK run into DIR"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[tuple[str, str, int, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        timings = PlatformTimings(job_pending_s=0.01, job_creating_s=0.01)
        with LocalPlatform(data_dir=data_dir, timings=timings) as platform:
            for model in args.models.split(","):
                for mode in args.modes.split(","):
                    for depth in [int(d) for d in args.depths.split(",")]:
                        rank = LORA_RANK if mode == "lora" else 0
                        result = measure(model, rank, depth, data_dir, platform, args.profile)
                        rows.append((model, mode, depth, result))
                        print(f"done {model} {mode} depth {depth}: {result['ratio']:.3f}")
    print(f"\ntorch {torch.__version__}, {args.threads} threads, device cpu, {_load()}")
    header = ["model", "mode", "depth", "batch × len", "SDK tokens/s", "plain tokens/s", "ratio"]
    print("| " + " | ".join([*header, "1st loss SDK / plain"]) + " |")
    print("|---|---|---:|---|---:|---:|---:|---|")
    for model, mode, depth, r in rows:
        shape = SHAPES[model]
        print(
            f"| {model} | {mode} | {depth} | {shape.batch} × {shape.seq_len} | "
            f"{r['sdk_tps']:,.0f} | "
            f"{r['plain_tps']:,.0f} | {r['ratio']:.3f} | "
            f"{r['first_loss_sdk']:.2f} / {r['first_loss_plain']:.2f} |"
        )
    roles = ["trainer", "native", "server", "client loop", "caller", "other"]
    print("\nCPU ms per step, by thread (SDK side; plain = the whole plain PyTorch step):")
    print("| model | mode | depth | " + " | ".join(roles) + " | SDK total | plain |")
    print("|---|---|---:|" + "---:|" * (len(roles) + 2))
    for model, mode, depth, r in rows:
        cells = [r.get(f"cpu_{role}", 0.0) for role in roles]
        print(
            f"| {model} | {mode} | {depth} | "
            + " | ".join(f"{c:.1f}" for c in cells)
            + f" | {sum(cells):.1f} | {r['cpu_plain']:.1f} |"
        )


def _load() -> str:
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


if __name__ == "__main__":
    main()
