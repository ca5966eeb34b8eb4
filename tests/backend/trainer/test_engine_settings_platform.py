"""`TrainerSettings.engine` reaches every model a trainer loads: the real local platform, the
stock tinker 0.23 client, the `tiny` model; a refused engine option reaches the client by name."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import tinker
import torch

from backend import LocalPlatform
from backend.trainer.settings import EngineSettings
from tests.trainer_support import BATCH, FAST_TIMINGS, FAST_TRAINERS, TrainerPlatform


@pytest.fixture(scope="module")
def tp() -> Iterator[TrainerPlatform]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TINKER_TELEMETRY", "0")
        with LocalPlatform(timings=FAST_TIMINGS) as platform:
            helper = TrainerPlatform(platform)
            yield helper
            helper.close()


def _client(tp: TrainerPlatform, job_id: str, engine: EngineSettings) -> tinker.TrainingClient:
    registry = tp.platform.state.trainers
    registry.settings = FAST_TRAINERS.model_copy(update={"engine": engine})
    try:
        service = tinker.ServiceClient(
            base_url=tp.create_job(job_id, lora_rank=4),
            api_key="tml-local-test",
            default_headers={"Authorization": f"Bearer {tp.api_key}"},
        )
        try:
            return service.create_lora_training_client("tiny", rank=4)
        finally:
            service.holder.close()  # type: ignore[no-untyped-call]
    finally:
        registry.settings = FAST_TRAINERS


def _logprobs(client: tinker.TrainingClient) -> list[torch.Tensor]:
    output = client.forward(BATCH, "cross_entropy").result()
    return [torch.tensor(out["logprobs"].data) for out in output.loss_fn_outputs]


def test_a_job_runs_the_engine_path_of_the_trainer_settings(tp: TrainerPlatform) -> None:
    reference = _logprobs(_client(tp, "engine-reference", EngineSettings()))
    fast = _logprobs(
        _client(tp, "engine-fast", EngineSettings.fast(autocast="off", logprob_chunk=3))
    )
    bf16 = _logprobs(_client(tp, "engine-bf16", EngineSettings.fast()))
    for want, got_fast, got_bf16 in zip(reference, fast, bf16, strict=True):
        torch.testing.assert_close(got_fast, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_bf16, want, rtol=0, atol=2e-2)
        assert not torch.equal(got_bf16, want)  # the bf16 path really ran


def test_an_engine_option_this_device_cannot_run_is_refused_by_name(tp: TrainerPlatform) -> None:
    with pytest.raises(tinker.RequestFailedError, match=r"engine\.compile needs a CUDA device"):
        _client(tp, "engine-compile", EngineSettings(compile=True))
