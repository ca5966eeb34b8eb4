"""Stock tinker clients, unmodified, against `fireloop backend` started as a user would: 0.23.0
(the JSON dialect our own SDK pins) and 0.38.0 (the protobuf dialect `pip install tinker` gives).

Each release lives in its own cached virtualenv, never the project's (see
`tests/compat/support.py`). The client script (`tinker_client.py`) trains a LoRA and a
full-parameter model, saves, reloads, creates a client from the saved state, samples and, on
0.38, closes its session. Both releases share one backend.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.compat.support import Backend, compat_python, run_client

CLIENT_SCRIPT = Path(__file__).with_name("tinker_client.py")
# The stock client refuses keys that do not start with `tml-` before sending anything.
BACKEND_API_KEY = f"tml-fireloop-{uuid.uuid4().hex}"
CLIENT_TIMEOUT_S = 240.0

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("tinker_version", ["0.23.0", "0.38.0"])
def test_stock_tinker_trains_saves_loads_and_samples(
    backend: Backend, tinker_version: str, tmp_path: Path
) -> None:
    python = compat_python("tinker", [f"tinker=={tinker_version}"])
    # As the README tells a user: publish the tokenizer where `from_pretrained(name)` looks.
    hf_home = tmp_path / "hf"
    publish = [sys.executable, "-m", "fireloop.cli", "tokenizers", "fireloop/tiny"]
    subprocess.run([*publish, "--hf-home", str(hf_home)], check=True, capture_output=True)
    env = {"TINKER_TELEMETRY": "0", "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home)}
    run = run_client(python, CLIENT_SCRIPT, [backend.url, backend.api_key], env, CLIENT_TIMEOUT_S)
    report = run.report

    assert report["tinker"] == tinker_version
    assert report["tokenizer_by_name"] == [97, 98, 99, 61]
    for kind in ("lora", "full"):
        seen = report[kind]
        assert seen["losses"][-1] < seen["losses"][0]
        assert seen["state_path"].startswith("tinker://") and seen["state_path"].endswith(
            "/weights/state-1"
        )
        assert len(seen["sample_tokens"]) == 2 and all(len(t) == 4 for t in seen["sample_tokens"])
        if tinker_version == "0.38.0":  # sequence ids came with 0.38
            assert all(seen["sequence_ids"]) and len(set(seen["sequence_ids"])) == 2
        assert seen["sampler_path"].endswith("/sampler_weights/sampler-1")
        assert seen["tokenizer"] == [97, 98, 99, 61]  # found offline through get_info's path
    assert backend.api_key not in run.output
