"""Drives a `fireloop backend` through the whole lifecycle with the published Fireworks SDK.

Usage: python fireworks_sdk_client.py CONTROL_URL API_KEY (run by the virtualenv that holds
`fireworks-ai[training-sdk]`). Only the SDK's public API is used: create a full-parameter trainer
job and wait for it, train a few steps, save and reload state, create a deployment linked to
the trainer, hotload a base then a delta snapshot through `WeightSyncer`, sample with prompt
log-probabilities, promote a snapshot, then delete the deployment and the job. Prints one JSON
line of what it saw; exits non-zero on any failure. Imports only the standard library and the SDK.
"""

from __future__ import annotations

import json
import math
import sys
import uuid
from importlib.metadata import version
from typing import Any

from fireworks.training.sdk import (
    DeploymentConfig,
    DeploymentManager,
    FiretitanServiceClient,
    TrainerJobConfig,
    TrainerJobManager,
    WeightSyncer,
    types,
)

BASE_MODEL = "fireloop/tiny"
TOKENS = [5, 9, 12, 7, 3, 11, 4, 8]
TIMEOUT_S = 120


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


def train_step(training: Any) -> float:
    result = training.forward_backward([datum(), datum()], "cross_entropy").result(
        timeout=TIMEOUT_S
    )
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=TIMEOUT_S)
    return float(result.metrics["loss:sum"])


def forward_logprobs(training: Any) -> list[float]:
    result = training.forward([datum()], "cross_entropy").result(timeout=TIMEOUT_S)
    return [float(x) for x in result.loss_fn_outputs[0]["logprobs"].tolist()]


def main(control_url: str, api_key: str) -> int:
    report: dict[str, Any] = {"fireworks_ai": version("fireworks-ai")}
    suffix = uuid.uuid4().hex[:6]
    trainers = TrainerJobManager(api_key=api_key, base_url=control_url)
    deployments = DeploymentManager(api_key=api_key, base_url=control_url)
    report["account"] = trainers.account_id

    endpoint = trainers.create_and_wait(
        TrainerJobConfig(
            base_model=BASE_MODEL,
            display_name=f"compat-{suffix}",
            max_context_length=64,
            learning_rate=1e-2,
            requested_job_id=f"fw-sdk-{suffix}",
        ),
        poll_interval_s=0.2,
        timeout_s=TIMEOUT_S,
    )
    job_id = endpoint.job_id
    report["job_id"] = job_id

    service = FiretitanServiceClient(base_url=endpoint.base_url, api_key=api_key)
    training = service.create_training_client(base_model=BASE_MODEL, lora_rank=0, seed=0)
    report["losses"] = [train_step(training) for _ in range(3)]

    before = forward_logprobs(training)
    saved = training.save_state("state-1").result(timeout=TIMEOUT_S)
    report["state_path"] = saved.path
    # The SDK refuses the `tinker://` path a trainer answers, before sending anything (it
    # accepts logical names and `cross_job://` references only), so it reloads by name.
    try:
        training.load_state_with_optimizer(saved.path)
        report["returned_path_refused"] = False
    except ValueError:
        report["returned_path_refused"] = True
    reloaded = []
    for reference in ("state-1", training.resolve_checkpoint_path("state-1", source_job_id=job_id)):
        train_step(training)
        training.load_state_with_optimizer(reference).result(timeout=TIMEOUT_S)
        reloaded.append([reference, forward_logprobs(training) == before])
    report["reloaded"] = reloaded

    deployment_id = f"fw-sdk-dep-{suffix}"
    deployments.create_or_get(
        DeploymentConfig(
            deployment_id=deployment_id,
            base_model=BASE_MODEL,
            hot_load_trainer_job=endpoint.job_name,
            accept_shapeless_risk=True,
        )
    )
    deployments.wait_for_ready(deployment_id, timeout_s=TIMEOUT_S, poll_interval_s=0.2)
    syncer = WeightSyncer(
        policy_client=training,
        deploy_mgr=deployments,
        deployment_id=deployment_id,
        base_model=BASE_MODEL,
        hotload_timeout=TIMEOUT_S,
        warmup_after_hotload=False,
    )
    base_snapshot = syncer.save_and_hotload("step-1")
    report["losses"].append(train_step(training))
    delta_snapshot = syncer.save_and_hotload("step-2")
    report["snapshots"] = [base_snapshot, delta_snapshot]
    report["served"] = syncer.check_deployment_state()

    sampling = syncer.get_sampling_client()
    prompt = types.ModelInput.from_ints(TOKENS[:4])
    sampled = sampling.sample(
        prompt,
        num_samples=2,
        sampling_params=types.SamplingParams(max_tokens=4, temperature=1.0),
        include_prompt_logprobs=True,
    ).result(timeout=TIMEOUT_S)
    report["sample_tokens"] = [list(s.tokens) for s in sampled.sequences]
    report["prompt_logprobs"] = list(sampled.prompt_logprobs or [])
    logprobs = sampling.compute_logprobs(prompt).result(timeout=TIMEOUT_S)
    report["computed_logprobs_finite"] = all(
        isinstance(x, float) and math.isfinite(x) for x in logprobs[1:]
    )
    report["computed_logprobs_len"] = len(logprobs)

    rows = trainers.list_checkpoints(job_id)
    report["checkpoints"] = [
        [row["name"].rsplit("/", 1)[-1], row.get("checkpointType")] for row in rows
    ]
    promotable = [row for row in rows if row.get("promotable")]
    promoted = trainers.promote_checkpoint(
        name=promotable[0]["name"], output_model_id=f"fw-sdk-model-{suffix}", base_model=BASE_MODEL
    )
    report["promoted"] = promoted.get("name") or promoted.get("model", {}).get("name")

    deployments.delete(deployment_id)
    report["deployment_after_delete"] = getattr(deployments.get(deployment_id), "state", None)
    trainers.delete(job_id)
    report["job_after_delete"] = (trainers.try_get(job_id) or {}).get("state")
    service.close()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
