"""The published Fireworks training SDK (`fireworks-ai[training-sdk]==1.2.30`), unmodified,
driving the whole lifecycle against `fireloop backend` started as a user would.

The SDK lives in its own cached virtualenv (see `tests/compat/support.py`); the client script
(`fireworks_sdk_client.py`) uses only its public API. The backend gets an ordinary `fw-` key:
the SDK's service client treats a `tml-` key as a plain tinker key and then refuses deployment
management and sampling, so one key serves control plane, trainer, hotload and inference.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.compat.support import Backend, compat_python, run_client

SDK_VERSION = "1.2.30"
CLIENT_SCRIPT = Path(__file__).with_name("fireworks_sdk_client.py")
CLIENT_TIMEOUT_S = 300.0

pytestmark = pytest.mark.slow


def test_published_fireworks_sdk_runs_the_whole_lifecycle(backend: Backend) -> None:
    python = compat_python("fireworks-sdk", [f"fireworks-ai[training-sdk]=={SDK_VERSION}"])
    run = run_client(python, CLIENT_SCRIPT, [backend.url, backend.api_key], {}, CLIENT_TIMEOUT_S)
    report = run.report
    job_id = report["job_id"]

    assert report["fireworks_ai"] == SDK_VERSION
    assert report["account"] == "local"
    losses = report["losses"]
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0] / 2
    # The trainer answers a tinker path, which the SDK refuses on its own; the name and the
    # cross-job reference it builds both bring back exactly the saved weights.
    assert report["state_path"] == f"tinker://{job_id}/weights/state-1"
    assert report["returned_path_refused"] is True
    assert report["reloaded"] == [
        ["state-1", True],
        [f"cross_job://{job_id}/state-1", True],
    ]
    base, delta = report["snapshots"]
    assert base.startswith("step-1-") and delta.startswith("step-2-")
    assert report["served"] == delta
    types = dict(report["checkpoints"])
    assert types["state-1"].endswith("TRAINING")
    assert types[base] == "CHECKPOINT_TYPE_INFERENCE_BASE"
    assert types[delta] == "CHECKPOINT_TYPE_INFERENCE_ARC_V2"
    assert len(report["sample_tokens"]) == 2 and all(len(t) == 4 for t in report["sample_tokens"])
    # One entry per prompt token; the SDK blanks the first itself (nothing predicts it).
    prompt_logprobs = report["prompt_logprobs"]
    assert len(prompt_logprobs) == 4 and prompt_logprobs[0] is None
    assert all(isinstance(x, float) and x < 0 for x in prompt_logprobs[1:])
    assert report["computed_logprobs_len"] == 4 and report["computed_logprobs_finite"]
    assert report["promoted"].startswith("accounts/local/models/fw-sdk-model-")
    assert report["deployment_after_delete"] is None
    assert report["job_after_delete"] == "JOB_STATE_DELETED"
    assert backend.api_key not in run.output
