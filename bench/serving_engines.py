"""The serving decoders in process: dynamic vs static KV cache, and batched vs one-by-one prefill.

No HTTP and no server: `BatchDecoder` (dynamic) and `StaticBatchDecoder` (static) decode the same
closed loop (C sequences running; each one that finishes is replaced by the next prompt, so
sequences join a running batch as in serving), in interleaved rounds, and report CPU ms per
generated token (process time, all threads: far steadier than wall clock on a loaded machine)
next to tokens/s of wall clock. The prefill rows time admitting C prompts in one padded forward
against C single-prompt admissions. Measures only, asserts nothing.

    .venv/bin/python bench/serving_engines.py                          # tiny, C = 8,32
    .venv/bin/python bench/serving_engines.py --models smollm2-135m --concurrency 8 --tokens 256
    .venv/bin/python bench/serving_engines.py --profile /tmp/engines-prof  # torch profiler
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch
from torch.profiler import ProfilerActivity, profile

from backend.models.registry import canonical_model_name
from backend.models.store import ensure_model_dir, model_context_length, resolve_models_dir
from backend.serving.engine import ServingEngineSettings, resolve_serving_engine
from backend.serving.generation import BatchDecoder, DecodingModel, DecodingSequence, SequenceSpec
from backend.serving.sampling import SamplingParams
from backend.serving.slots import new_decoder
from backend.serving.weights import ModelFactory

ENGINES = ("dynamic", "static")


def make_sequence(index: int, vocab: int, prompt_tokens: int, max_tokens: int) -> DecodingSequence:
    rng = random.Random(index)
    prompt = tuple(rng.randrange(32, vocab - 3) for _ in range(prompt_tokens))
    # Temperature 1 as the sampling benchmark; EOS never stops it, so every request is as long.
    spec = SequenceSpec(prompt, max_tokens, SamplingParams(), seed=index)
    return DecodingSequence(spec)


def closed_loop(
    decoder: BatchDecoder, make: Callable[[int], DecodingSequence], concurrency: int, tokens: int
) -> tuple[float, float, int]:
    """Keep `concurrency` sequences running until `tokens` are generated: (cpu s, wall s, n)."""
    started_cpu, started = time.process_time(), time.perf_counter()
    next_index, generated = 0, 0
    running: list[DecodingSequence] = []
    while generated < tokens:
        joining = [make(next_index + i) for i in range(concurrency - len(decoder.active))]
        next_index += len(joining)
        decoder.admit(joining)
        running += joining
        decoder.step()
        generated = sum(len(s.tokens) for s in running)
    return time.process_time() - started_cpu, time.perf_counter() - started, generated


def prefill(decoder: BatchDecoder, sequences: list[DecodingSequence], batched: bool) -> float:
    """CPU seconds to admit `sequences` at once (one padded forward) or one at a time."""
    started = time.process_time()
    if batched:
        decoder.admit(sequences)
    else:
        for sequence in sequences:
            decoder.admit([sequence])
    elapsed = time.process_time() - started
    decoder.cancel_all()
    return elapsed


def decoder_for(model: DecodingModel, engine: str) -> BatchDecoder:
    settings = ServingEngineSettings(kv_cache=engine)  # type: ignore[arg-type]
    return new_decoder(model, resolve_serving_engine(settings, "cpu", model.context_length))


def run_model(name: str, args: argparse.Namespace) -> None:
    models = resolve_models_dir()
    context = model_context_length(name, models)
    factory = ModelFactory(ensure_model_dir(name, models), torch.device("cpu"), context)
    model = factory.base()
    max_tokens = min(args.max_tokens, context - args.prompt_tokens)

    def make(index: int) -> DecodingSequence:
        return make_sequence(index, model.vocab_size, args.prompt_tokens, max_tokens)

    print(f"\n{name}: prompts of {args.prompt_tokens}, max_tokens {max_tokens}, CPU")
    print("| engine | concurrency | CPU ms / token (median) | tokens/s wall (median) |")
    print("|---|---:|---:|---:|")
    for concurrency in args.concurrency:
        samples: dict[str, list[tuple[float, float, int]]] = {e: [] for e in ENGINES}
        for _ in range(args.rounds):  # A, B, A, B: the machine's load hits both alike
            for engine in ENGINES:
                decoder = decoder_for(model, engine)
                closed_loop(decoder, make, concurrency, concurrency * 4)  # warm-up
                samples[engine].append(closed_loop(decoder, make, concurrency, args.tokens))
        for engine in ENGINES:
            cpu_ms = statistics.median(1e3 * c / n for c, _, n in samples[engine])
            rate = statistics.median(n / w for _, w, n in samples[engine])
            print(f"| {engine} | {concurrency} | {cpu_ms:.2f} | {rate:,.1f} |")
    print("| prefill | prompts | CPU ms / prompt, batched (median) | one by one (median) |")
    print("|---|---:|---:|---:|")
    for concurrency in args.concurrency:
        batched, single = [], []
        for _ in range(args.rounds):
            decoder = decoder_for(model, "dynamic")
            sequences = [make(i) for i in range(concurrency)]
            batched.append(prefill(decoder, sequences, batched=True) / concurrency)
            sequences = [make(i) for i in range(concurrency)]
            single.append(prefill(decoder, sequences, batched=False) / concurrency)
        print(
            f"| dynamic | {concurrency} | {1e3 * statistics.median(batched):.2f} | "
            f"{1e3 * statistics.median(single):.2f} |"
        )
    if args.profile is not None:
        write_profiles(model, make, args, name)


def write_profiles(
    model: DecodingModel,
    make: Callable[[int], DecodingSequence],
    args: argparse.Namespace,
    name: str,
) -> None:
    """A torch profiler trace and operator table per engine, at the first concurrency."""
    args.profile.mkdir(parents=True, exist_ok=True)
    concurrency = args.concurrency[0]
    for engine in ENGINES:
        decoder = decoder_for(model, engine)
        closed_loop(decoder, make, concurrency, concurrency * 4)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            closed_loop(decoder, make, concurrency, args.tokens)
        stem = args.profile / f"serving-{name}-{engine}-c{concurrency}"
        prof.export_chrome_trace(str(stem.with_suffix(".trace.json")))
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        stem.with_suffix(".ops.txt").write_text(table, encoding="utf-8")
        print(f"profile: {stem}.trace.json, {stem}.ops.txt")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny", help="comma-separated: tiny,smollm2-135m")
    parser.add_argument(
        "--concurrency", default=[8, 32], type=lambda v: [int(c) for c in v.split(",")]
    )
    parser.add_argument("--tokens", type=int, default=1024, help="generated tokens per sample")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per engine")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--profile", type=Path, help="write torch profiler traces into DIR")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"torch {torch.__version__}, CPU, {args.threads} threads, load average {load}")
    for name in args.models.split(","):
        run_model(canonical_model_name(name), args)


if __name__ == "__main__":
    main()
