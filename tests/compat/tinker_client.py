"""Drives a `fireloop backend` with an unmodified stock tinker client, 0.23 or 0.38 (run by that
client's venv).

Usage: python tinker_client.py CONTROL_URL API_KEY. The key must start with `tml-` (the stock
client refuses other keys before sending anything), so the backend is started with such a key.
For one LoRA job and one full-parameter job it trains (forward_backward + optim_step), runs a
forward, saves and reloads state, creates a client from the saved state (create-via-load),
samples from an ephemeral and a named snapshot, reads the tokenizer (through get_info and by
the model's name) and, where the release has
sessions to close (0.38), closes its session; it prints one JSON line of what it saw and exits
non-zero on any failure. This file imports only the standard library, tinker and its
dependencies: it runs outside the project's virtualenv.
"""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
from typing import Any

import httpx
import tinker
from tinker import types

ACCOUNT = "local"
BASE_MODEL = "fireloop/tiny"
TOKENS = [5, 9, 12, 7, 3, 11, 4, 8]


def create_job(control: httpx.Client, lora_rank: int) -> str:
    job_id = f"tinker-{'lora' if lora_rank else 'full'}-{uuid.uuid4().hex[:6]}"
    config = {"baseModel": BASE_MODEL, "loraRank": lora_rank, "maxContextLength": 64}
    response = control.post(
        f"/v1/accounts/{ACCOUNT}/rlorTrainerJobs",
        params={"rlorTrainerJobId": job_id},
        json={"trainingConfig": config},
    )
    response.raise_for_status()
    deadline = time.monotonic() + 60
    while (
        control.get(f"/v1/accounts/{ACCOUNT}/rlorTrainerJobs/{job_id}").json()["state"]
        != "JOB_STATE_RUNNING"
    ):
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} did not reach RUNNING")
        time.sleep(0.1)
    return job_id


def ready(value: Any) -> Any:
    """A client that 0.38 returns as a future and 0.23 returns as is."""
    return value.result(timeout=120) if hasattr(value, "result") else value


def datum() -> types.Datum:
    n = len(TOKENS)
    return types.Datum(
        model_input=types.ModelInput.from_ints(TOKENS),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=[*TOKENS[1:], 2], dtype="int64", shape=[n]),
            "weights": types.TensorData(
                data=[0.0] * 3 + [1.0] * (n - 3), dtype="float32", shape=[n]
            ),
        },
    )


def rl_datum() -> types.Datum:
    n = len(TOKENS)
    return types.Datum(
        model_input=types.ModelInput.from_ints(TOKENS),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=[*TOKENS[1:], 2], dtype="int64", shape=[n]),
            "logprobs": types.TensorData(data=[-3.0] * n, dtype="float32", shape=[n]),
            "advantages": types.TensorData(
                data=[0.0] * 3 + [1.0] * (n - 3), dtype="float32", shape=[n]
            ),
        },
    )


def exercise(service: tinker.ServiceClient, lora_rank: int) -> dict[str, Any]:
    report: dict[str, Any] = {}
    training = ready(
        service.create_lora_training_client(base_model=BASE_MODEL, rank=lora_rank, seed=0)
    )
    adam = types.AdamParams(learning_rate=1e-2)
    losses = []
    for _ in range(3):
        fwdbwd = training.forward_backward([datum(), datum()], "cross_entropy").result(timeout=120)
        training.optim_step(adam).result(timeout=120)
        losses.append(fwdbwd.metrics["loss:sum"])
        assert len(fwdbwd.loss_fn_outputs) == 2
        assert fwdbwd.loss_fn_outputs[0]["logprobs"].shape == [len(TOKENS)]
    report["losses"] = losses
    assert losses[-1] < losses[0], f"loss did not decrease: {losses}"
    ppo = training.forward_backward([rl_datum()], "ppo", {"clip_low_threshold": 0.8}).result(
        timeout=120
    )
    report["ppo_loss"] = ppo.metrics["loss:sum"]
    before = training.forward([datum()], "cross_entropy").result(timeout=120)
    lp_before = before.loss_fn_outputs[0]["logprobs"].tolist()
    saved = training.save_state("state-1").result(timeout=120)
    report["state_path"] = saved.path
    training.forward_backward([datum()], "cross_entropy").result(timeout=120)
    training.optim_step(adam).result(timeout=120)
    training.load_state(saved.path).result(timeout=120)
    after = training.forward([datum()], "cross_entropy").result(timeout=120)
    assert after.loss_fn_outputs[0]["logprobs"].tolist() == lp_before, "load_state differs"
    restored = ready(service.create_training_client_from_state_with_optimizer(saved.path))
    again = restored.forward([datum()], "cross_entropy").result(timeout=120)
    assert again.loss_fn_outputs[0]["logprobs"].tolist() == lp_before, "from_state differs"
    restored.forward_backward([datum()], "cross_entropy").result(timeout=120)
    restored.optim_step(adam).result(timeout=120)
    sampler = ready(training.save_weights_and_get_sampling_client())
    params = types.SamplingParams(max_tokens=4, temperature=1.0, seed=1)
    prompt = types.ModelInput.from_ints(TOKENS[:4])
    sampled = sampler.sample(prompt, num_samples=2, sampling_params=params).result(timeout=120)
    assert len(sampled.sequences) == 2
    report["sample_tokens"] = [list(s.tokens) for s in sampled.sequences]
    # Sequence ids came with 0.38; 0.23's sequences have none.
    report["sequence_ids"] = [getattr(s, "sequence_id", None) for s in sampled.sequences]
    named = training.save_weights_for_sampler("sampler-1").result(timeout=120)
    report["sampler_path"] = named.path
    by_path = ready(service.create_sampling_client(model_path=named.path))
    again_sampled = by_path.sample(prompt, num_samples=2, sampling_params=params).result(
        timeout=120
    )
    # Same weights, same seed: the named snapshot samples what the ephemeral one did.
    assert [list(s.tokens) for s in again_sampled.sequences] == report["sample_tokens"]
    report["tokenizer"] = training.get_tokenizer().encode("abc=")
    logprobs = sampler.compute_logprobs(prompt).result(timeout=120)
    assert logprobs[0] is None and all(
        isinstance(x, float) and math.isfinite(x) for x in logprobs[1:]
    )
    return report


def main(control_url: str, api_key: str) -> int:
    control = httpx.Client(base_url=control_url, headers={"X-Api-Key": api_key}, timeout=60)
    results: dict[str, Any] = {"tinker": tinker.__version__}
    # What recipes do: look the tokenizer up by the model's name (offline, in the HF cache
    # that `fireloop tokenizers` filled).
    from transformers import AutoTokenizer

    results["tokenizer_by_name"] = AutoTokenizer.from_pretrained(BASE_MODEL).encode("abc=")
    for rank in (8, 0):
        job_id = create_job(control, rank)
        trainer_base = f"{control_url}/training/v1/rlorTrainerJobs/{ACCOUNT}/{job_id}"
        service = tinker.ServiceClient(base_url=trainer_base, api_key=api_key)
        results["lora" if rank else "full"] = exercise(service, rank)
        if hasattr(service, "close"):  # 0.38 finishes its session; 0.23 has none to close
            service.close("success").result(timeout=60)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
