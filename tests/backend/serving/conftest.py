"""A real `LocalPlatform` with the tiny model, driven over raw HTTP: deployments, completions,
hotload; trainers reached through the Firetitan client to produce real sampler snapshots.

Timers are short and the serving settings observable (`FAST_SERVING`); a test that needs a slow
load or a slow start swaps the runtime's settings and puts them back.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch
from tinker import types

from backend import LocalPlatform
from backend.serving import ServingSettings
from sdk import FiretitanServiceClient, FiretitanTrainingClient, GradAccNormalization
from tests.trainer_support import BATCH, FAST_TIMINGS, TrainerPlatform, make_datum

ACCOUNT = "local"
DEPLOYMENTS = f"/v1/accounts/{ACCOUNT}/deployments"
HOTLOAD = "/hot_load/v1/models/hot_load"
COMPLETIONS = "/inference/v1/completions"
FAST_SERVING = ServingSettings(completed_hold_s=0.05, scale_up_timeout_s=60)
ADAM = types.AdamParams(learning_rate=1e-2)
# "abc=cba" and EOS: the reversal task's format.
SEQUENCE = [*b"abc=", *b"cba", 258]
TOLERANCE = 1e-4
_WAIT_S = 60.0


def model_name(deployment_id: str) -> str:
    return f"accounts/{ACCOUNT}/deployments/{deployment_id}"


class ServingHarness(TrainerPlatform):
    """`TrainerPlatform` plus deployments, completions and hotload over plain HTTP."""

    def __init__(self, platform: LocalPlatform) -> None:
        super().__init__(platform)
        self._services: list[FiretitanServiceClient] = []

    # -- deployments ----------------------------------------------------------------------------

    def deploy(self, deployment_id: str, job_id: str | None = None, **fields: Any) -> None:
        """Create a tiny deployment (linked to `job_id`) and wait until it is READY."""
        body: dict[str, Any] = {"baseModel": "tiny", "enableHotLoad": True, **fields}
        if job_id is not None:
            body["hotLoadTrainerJob"] = f"accounts/{ACCOUNT}/rlorTrainerJobs/{job_id}"
        created = self.http.post(DEPLOYMENTS, params={"deploymentId": deployment_id}, json=body)
        assert created.status_code == 200, created.text
        self.wait_state(deployment_id, "READY")

    def deployment(self, deployment_id: str) -> dict[str, Any]:
        response = self.http.get(f"{DEPLOYMENTS}/{deployment_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def wait_state(self, deployment_id: str, state: str) -> None:
        deadline = time.monotonic() + _WAIT_S
        while self.deployment(deployment_id)["state"] != state:
            assert time.monotonic() < deadline, f"{deployment_id} never reached {state}"
            time.sleep(0.01)

    # -- completions ----------------------------------------------------------------------------

    def complete(self, deployment_id: str, **body: Any) -> httpx.Response:
        return self.http.post(COMPLETIONS, json={"model": model_name(deployment_id), **body})

    def stream(self, deployment_id: str, **body: Any) -> tuple[list[dict[str, Any]], bool]:
        """The parsed `data:` chunks of a streamed completion, and whether [DONE] ended it."""
        payload = {"model": model_name(deployment_id), "stream": True, **body}
        with self.http.stream("POST", COMPLETIONS, json=payload) as response:
            assert response.status_code == 200, response.read().decode()
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        done = bool(lines) and lines[-1] == "data: [DONE]"
        chunks = [json.loads(line.removeprefix("data: ")) for line in lines if "[DONE]" not in line]
        return chunks, done

    def score(self, deployment_id: str, tokens: list[int]) -> torch.Tensor:
        """The served logprob of every token after the first (echo, no generation), fp64."""
        response = self.complete(
            deployment_id, prompt=tokens, max_tokens=0, echo=True, logprobs=True
        )
        assert response.status_code == 200, response.text
        content = response.json()["choices"][0]["logprobs"]["content"]
        assert len(content) == len(tokens) and content[0]["logprob"] == 0.0
        return torch.tensor([entry["logprob"] for entry in content[1:]], dtype=torch.float64)

    # -- hotload --------------------------------------------------------------------------------

    def hotload(
        self,
        deployment_id: str,
        identity: str,
        metadata: dict[str, str] | None = None,
        *,
        model: str = "tiny",
        **extra: Any,
    ) -> httpx.Response:
        body: dict[str, Any] = {"identity": identity, "reset_prompt_cache": True, **extra}
        if metadata is not None:
            body["incremental_snapshot_metadata"] = metadata
        return self.http.post(
            HOTLOAD, json=body, headers=self._hotload_headers(deployment_id, model)
        )

    def status(self, deployment_id: str) -> list[dict[str, Any]]:
        """The `replicas` of the hotload status."""
        response = self.http.get(HOTLOAD, headers=self._hotload_headers(deployment_id, "tiny"))
        assert response.status_code == 200, response.text
        replicas: list[dict[str, Any]] = response.json()["replicas"]
        return replicas

    def wait_loaded(self, deployment_id: str, identity: str) -> dict[str, Any]:
        """Poll as the SDK does until the replica serves `identity` (AssertionError on its
        error stage, with the server's message)."""
        deadline = time.monotonic() + _WAIT_S
        while time.monotonic() < deadline:
            replicas = self.status(deployment_id)
            if replicas:
                replica = replicas[0]
                state = replica["loading_state"]
                if state["stage"] == "error" and state["target_snapshot_identity"] == identity:
                    raise AssertionError(f"hotload of {identity} failed: {state['message']}")
                loaded = {a["identity"] for a in replica["loaded_adapters"]}
                served = replica["current_snapshot_identity"] == identity or identity in loaded
                if replica["readiness"] and served:
                    return replica
            time.sleep(0.01)
        raise AssertionError(f"{deployment_id} never served {identity}")

    def wait_error(self, deployment_id: str, identity: str) -> dict[str, Any]:
        """Poll until the load of `identity` ends in stage `error`; the replica."""
        deadline = time.monotonic() + _WAIT_S
        while time.monotonic() < deadline:
            replica = self.status(deployment_id)[0]
            state = replica["loading_state"]
            if state["target_snapshot_identity"] == identity and state["stage"] == "error":
                return replica
            assert state["stage"] in ("downloading", "loading", "idle", "completed", "error")
            time.sleep(0.01)
        raise AssertionError(f"the load of {identity} never failed")

    def _hotload_headers(self, deployment_id: str, model: str) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self.api_key}",
            "fireworks-model": model,
            "fireworks-deployment": model_name(deployment_id),
        }

    # -- training -------------------------------------------------------------------------------

    def training_client(self, job_id: str, lora_rank: int = 0) -> FiretitanTrainingClient:
        """A RUNNING job of the tiny model and a Firetitan training client on it."""
        service = FiretitanServiceClient(self.create_job(job_id, lora_rank=lora_rank), self.api_key)
        self._services.append(service)
        return service.create_training_client("tiny", lora_rank=lora_rank, lora_alpha=16)

    def close(self) -> None:
        for service in self._services:
            service.close()
        super().close()


def train(client: FiretitanTrainingClient, steps: int = 2) -> None:
    for _ in range(steps):
        client.forward_backward(BATCH, "cross_entropy")
        client.optim_step(ADAM, GradAccNormalization.NUM_LOSS_TOKENS).result()


def save(client: FiretitanTrainingClient, name: str, kind: str) -> str:
    """Save a sampler snapshot (`base`, `delta`); its identity."""
    return client.save_weights_for_sampler_ext(name, checkpoint_type=kind).snapshot_name


def trainer_logprobs(client: FiretitanTrainingClient, tokens: list[int]) -> torch.Tensor:
    """The trainer's `forward` logprob of every token after the first, fp64."""
    datum = make_datum(tokens[:-1], tokens[1:], [1.0] * (len(tokens) - 1))
    output = client.forward([datum], "cross_entropy").result()
    return torch.tensor(output.loss_fn_outputs[0]["logprobs"].data, dtype=torch.float64)


def delta_metadata(previous: str, **overrides: str) -> dict[str, str]:
    return {
        "previous_snapshot_identity": previous,
        "compression_format": "arc_v2",
        "checksum_format": "alder32",
        **overrides,
    }


@pytest.fixture(scope="module")
def harness() -> Iterator[ServingHarness]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TINKER_TELEMETRY", "0")
        with LocalPlatform(timings=FAST_TIMINGS) as platform:
            platform.state.serving.settings = FAST_SERVING
            serving = ServingHarness(platform)
            yield serving
            serving.close()


@pytest.fixture
def slow_loads(harness: ServingHarness) -> Iterator[None]:
    """Hotloads stay in `downloading` for 1 s, so a test can act during one."""
    harness.platform.state.serving.settings = FAST_SERVING.model_copy(update={"load_delay_s": 1.0})
    yield
    harness.platform.state.serving.settings = FAST_SERVING
