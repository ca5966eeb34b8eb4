"""Sampling throughput: a deployment of the local platform driven through the SDK vs HF generate.

The platform runs as `fireloop backend` in a child process (client and server must not share a
GIL); C workers keep C completions in flight through `DeploymentSampler` for a fixed time per
concurrency level, and every generated token id they get back counts. The baseline is plain
`model.generate` on the same fp32 weights, device and thread count, run after the server has
stopped so the two never compete for cores. Same prompts, seeds and sampling (temperature 1,
top_p 1, top_k off) on both sides. Prints a table per model; measures only, asserts nothing.

    .venv/bin/python bench/sampling_throughput.py                       # tiny, C = 1,8,32,64
    .venv/bin/python bench/sampling_throughput.py --models smollm2-135m --concurrency 1,32
    .venv/bin/python bench/sampling_throughput.py --data-dir /tmp/fl-bench  # keep built models
    .venv/bin/python bench/sampling_throughput.py --models smollm2-135m \\
        --max-tokens 128 --baseline-batch 64                             # the GPU baseline
    .venv/bin/python bench/sampling_throughput.py --kv-cache dynamic,static  # both engines
    .venv/bin/python bench/sampling_throughput.py --profile /tmp/sampling-prof  # py-spy, server

`--kv-cache` picks the server's KV cache (`ServingEngineSettings.kv_cache`, passed to the server
as `$FIRELOOP_SERVING_ENGINE`); with several, each gets its own server, run one after another.
`--profile DIR` writes a py-spy profile of the server process (every thread) per level.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import cast

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TINKER_TELEMETRY", "0")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # a "Loading weights" bar per load

import httpx
import torch
from profiling import profiled  # bench/profiling.py, beside this script

from backend.models.registry import canonical_model_name
from backend.models.store import ensure_model_dir, resolve_models_dir
from backend.platform import generate_api_key
from backend.serving.engine import ENGINE_ENV, ServingEngineSettings
from backend.trainer.modeling import load_hf_model
from sdk import DeploymentConfig, DeploymentManager, DeploymentSampler, FixedConcurrencyController

# Per-model default of --max-tokens: a smollm2 request on CPU takes seconds, so keep it shorter.
DEFAULT_MAX_TOKENS = {"tiny": 64, "smollm2-135m": 32}
PROMPT_COUNT = 1024  # distinct prompts, cycled; request i gets prompt i % PROMPT_COUNT and seed i
SERVER_START_TIMEOUT_S = 120.0
SERVER_STOP_TIMEOUT_S = 30.0
DEPLOYMENT_TIMEOUT_S = 600.0
# A level stops admitting requests after --seconds; those in flight get this long to finish.
DRAIN_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Load:
    """What every request of a run asks for, and for how long each level runs."""

    prompts: list[list[int]]
    max_tokens: int
    seconds: float


@dataclass(frozen=True)
class Measurement:
    """Completed requests and their generated tokens over one timed level."""

    side: str
    concurrency: int
    requests: int
    tokens: int
    elapsed_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s


def make_prompts(vocab: int, length: int, seed: int = 0) -> list[list[int]]:
    """Deterministic random prompts; ids below 32 and the last three are left out (specials)."""
    rng = random.Random(seed)
    return [[rng.randrange(32, vocab - 3) for _ in range(length)] for _ in range(PROMPT_COUNT)]


def vocab_size(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return int(config["vocab_size"])


def serving_device() -> torch.device:
    """Where the platform's replicas run (`ServingSettings.device == "auto"`)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# -- the platform in a child process ---------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def platform_server(
    data_dir: Path, api_key: str, threads: int, log_path: Path, engine: ServingEngineSettings
) -> Iterator[tuple[str, int]]:
    """`fireloop backend` on a free loopback port serving with `engine`; yields its base URL
    and process id, stops it on exit."""
    port = free_port()
    command = [sys.executable, "-m", "fireloop.cli", "backend", "--port", str(port)]
    command += ["--data-dir", str(data_dir), "--api-key", api_key]
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env[ENGINE_ENV] = engine.model_dump_json()
    with log_path.open("wb") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(server, base_url, api_key, log_path)
        yield base_url, server.pid
    finally:
        stop(server)


def wait_until_serving(
    server: subprocess.Popen[bytes], base_url: str, api_key: str, log_path: Path
) -> None:
    """Poll the control plane until it answers; fail with the server's log if it never does."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    headers = {"X-Api-Key": api_key}
    while time.monotonic() < deadline and server.poll() is None:
        try:
            httpx.get(f"{base_url}/v1/accounts", headers=headers, timeout=2.0)
            return
        except httpx.TransportError:
            time.sleep(0.2)
    tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
    why = f"exited with {server.returncode}" if server.poll() is not None else "never answered"
    raise RuntimeError(f"platform server {why}; end of {log_path}:\n{tail}")


def stop(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM (uvicorn shuts down gracefully), then SIGKILL if it lingers."""
    if server.poll() is not None:
        return
    server.terminate()
    try:
        server.wait(timeout=SERVER_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print(f"platform server {server.pid} ignored SIGTERM; killing it", flush=True)
        server.kill()
        server.wait(timeout=SERVER_STOP_TIMEOUT_S)


@contextmanager
def deployment(base_url: str, api_key: str, model: str) -> Iterator[DeploymentManager]:
    """A READY one-replica deployment `bench-<model>` of the base model, deleted on exit."""
    config = DeploymentConfig(
        deployment_id=f"bench-{model}", base_model=f"fireloop/{model}", min_replica_count=1
    )
    with DeploymentManager(api_key=api_key, base_url=base_url) as deployments:
        # force_recreate: a reused --data-dir may hold one left by an interrupted run.
        deployments.create_or_get(config, force_recreate=True, delete_poll_interval_s=0.2)
        try:
            deployments.wait_for_ready(
                config.deployment_id, timeout_s=DEPLOYMENT_TIMEOUT_S, poll_interval_s=0.2
            )
            yield deployments
        finally:
            deployments.delete(config.deployment_id)


# -- the platform side: a closed loop of C workers -------------------------------------------


async def closed_loop(sampler: DeploymentSampler, load: Load, concurrency: int) -> Measurement:
    """C workers, each sending its next request as soon as the last one returns, for
    `load.seconds`; requests in flight at the end finish and count, and so does their time."""
    next_request = iter(range(sys.maxsize))
    requests = tokens = 0

    async def sample(index: int) -> int:
        completions = await sampler.sample_with_prompt_tokens(
            load.prompts[index % len(load.prompts)],
            n=1,
            max_tokens=load.max_tokens,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            seed=index,
        )
        return sum(len(completion.completion_tokens) for completion in completions)

    async def worker(stop_at: float) -> None:
        nonlocal requests, tokens
        while time.perf_counter() < stop_at:
            generated = await sample(next(next_request))
            # Add after the await: `tokens += await …` would read `tokens` before it.
            requests, tokens = requests + 1, tokens + generated

    await sample(next(next_request))  # warm-up, not counted
    started = time.perf_counter()
    async with asyncio.timeout(load.seconds + DRAIN_TIMEOUT_S), asyncio.TaskGroup() as workers:
        for _ in range(concurrency):
            workers.create_task(worker(started + load.seconds))
    elapsed = time.perf_counter() - started
    return Measurement("platform via SDK", concurrency, requests, tokens, elapsed)


async def measure_level(
    deployments: DeploymentManager, model: str, load: Load, concurrency: int
) -> Measurement:
    sampler = deployments.create_sampler(
        f"bench-{model}", concurrency_controller=FixedConcurrencyController(concurrency)
    )
    try:
        return await closed_loop(sampler, load, concurrency)
    finally:
        await sampler.aclose()


@dataclass(frozen=True)
class ServerRun:
    """How the platform side runs: its threads, KV cache engine, log and profile directory."""

    threads: int
    engine: ServingEngineSettings
    log_path: Path
    profile: Path | None


def measure_platform(
    model: str, load: Load, concurrencies: list[int], data_dir: Path, run: ServerRun
) -> list[Measurement]:
    api_key = generate_api_key()
    results: list[Measurement] = []
    kv = run.engine.kv_cache
    with (
        platform_server(data_dir, api_key, run.threads, run.log_path, run.engine) as (url, pid),
        deployment(url, api_key, model) as deployments,
    ):
        for concurrency in concurrencies:
            name = f"sampling-{model}-{kv}-c{concurrency}"
            with profiled(run.profile, name, rate=100, pid=pid):
                result = asyncio.run(measure_level(deployments, model, load, concurrency))
            result = replace(result, side=f"platform via SDK, {kv} KV")
            results.append(result)
            print(
                f"{model}: {kv} KV, concurrency {concurrency}: {result.tokens_per_s:,.1f} tokens/s"
            )
    return results


# -- the baseline: sequential HF generate ----------------------------------------------------


def generated_lengths(new_tokens_BN: torch.Tensor, eos_ids: set[int]) -> list[int]:
    """Tokens each row generated, its first EOS included (the server counts it too); HF pads
    a row that stopped early."""
    lengths = []
    for row in new_tokens_BN.tolist():
        stops = [i for i, token in enumerate(row) if token in eos_ids]
        lengths.append(stops[0] + 1 if stops else len(row))
    return lengths


def measure_generate(model_dir: Path, load: Load, batch: int) -> Measurement:
    """`model.generate` on `batch` prompts at a time, one call after another, for
    `load.seconds` (the call running at the end finishes and counts)."""
    device = serving_device()
    model = load_hf_model(model_dir, device)
    cast(torch.nn.Module, model).eval()
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    # The sampler's parameters, overriding whatever generation config the model ships.
    sampling = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0}

    def generate(first: int) -> list[int]:
        indices = range(first, first + batch)
        prompts_BP = torch.tensor([load.prompts[i % len(load.prompts)] for i in indices])
        torch.manual_seed(first)
        with torch.no_grad(), autocast(device):
            out_BT = model.generate(  # type: ignore[operator]  # mypy sees nn.Module.__getattr__
                prompts_BP.to(device),
                attention_mask=torch.ones_like(prompts_BP).to(device),
                max_new_tokens=load.max_tokens,
                **sampling,
            )
        return generated_lengths(out_BT[:, prompts_BP.shape[1] :], eos_ids)

    generate(0)  # warm-up, not counted
    requests = tokens = 0
    started = time.perf_counter()
    while time.perf_counter() < started + load.seconds:
        lengths = generate(requests + 1)
        requests, tokens = requests + len(lengths), tokens + sum(lengths)
    elapsed = time.perf_counter() - started
    return Measurement(f"HF generate, batch {batch}", batch, requests, tokens, elapsed)


def autocast(device: torch.device) -> AbstractContextManager[object]:
    # The server's numerics (`backend.serving.generation._autocast`): bf16 matmuls on GPU.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# -- the report ------------------------------------------------------------------------------


def print_table(model: str, load: Load, baseline: Measurement, rows: list[Measurement]) -> None:
    prompt_len = len(load.prompts[0])
    print(
        f"\n{model}: prompts of {prompt_len} tokens, max_tokens {load.max_tokens}, "
        f"temperature 1, top_p 1, top_k off, {load.seconds:g} s per level"
    )
    print("| side | concurrency | requests | generated tokens | tokens/s | × baseline |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in [baseline, *rows]:
        print(
            f"| {row.side} | {row.concurrency} | {row.requests:,} | {row.tokens:,} | "
            f"{row.tokens_per_s:,.1f} | {row.tokens_per_s / baseline.tokens_per_s:.2f} |"
        )


def run_model(model: str, args: argparse.Namespace, data_dir: Path, log_dir: Path) -> None:
    # Built here, before the server starts, so the build is not part of a deployment's start.
    model_dir = ensure_model_dir(model, resolve_models_dir())  # the cache the server reads
    load = Load(
        prompts=make_prompts(vocab_size(model_dir), args.prompt_tokens),
        max_tokens=args.max_tokens or DEFAULT_MAX_TOKENS.get(model, 64),
        seconds=args.seconds,
    )
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    rows = []
    for kv_cache in args.kv_cache.split(","):
        engine = ServingEngineSettings(kv_cache=kv_cache, static_max_len=args.static_max_len)
        log_path = log_dir / f"server-{model}-{kv_cache}.log"
        run = ServerRun(args.threads, engine, log_path, args.profile)
        rows += measure_platform(model, load, concurrencies, data_dir, run)
    # Only now, with the server stopped, so the baseline has the cores to itself.
    baseline = measure_generate(model_dir, load, args.baseline_batch)
    print(f"{model}: {baseline.side}: {baseline.tokens_per_s:,.1f} tokens/s")
    print_table(model, load, baseline, rows)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny", help="comma-separated: tiny,smollm2-135m")
    parser.add_argument("--concurrency", default="1,8,32,64", help="comma-separated levels")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed length of a level")
    parser.add_argument("--max-tokens", type=int, help="default: 64 (tiny), 32 (smollm2-135m)")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--baseline-batch", type=int, default=1, help="prompts per generate")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--data-dir", type=Path, help="reuse built models (default: a temp dir)")
    parser.add_argument(
        "--kv-cache", default="auto", help="server KV cache(s): auto, dynamic, static (comma list)"
    )
    parser.add_argument(
        "--static-max-len",
        type=lambda v: v if v == "auto" else int(v),
        default="auto",
        help="tokens per slot of the static cache (default: the context, at most 2048)",
    )
    parser.add_argument("--profile", type=Path, help="write a py-spy profile per level into DIR")
    return parser.parse_args()


def exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # SystemExit unwinds through the `finally`s, which stop the server subprocess.
    raise SystemExit(128 + signum)


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, device {serving_device()}, {args.threads} threads "
        "(server and baseline)"
    )
    with tempfile.TemporaryDirectory(prefix="fl-bench-sampling-") as tmp:
        data_dir = args.data_dir or Path(tmp) / "platform"
        data_dir.mkdir(parents=True, exist_ok=True)
        for model in args.models.split(","):
            # `fireloop/tiny` → `tiny`: the name becomes part of the deployment id.
            run_model(canonical_model_name(model), args, data_dir, log_dir=Path(tmp))


if __name__ == "__main__":
    main()
