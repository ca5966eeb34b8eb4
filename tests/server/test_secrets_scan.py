"""A platform key planted in the worker's environment and in a Prefect Secret block is written
nowhere: not in the server's database, the flow runs' logs and artifacts, the run directories
(ledger, metrics, checkpoints' metadata, W&B's offline files) or the worker's output.

A real Prefect server on SQLite, a process worker whose environment holds the key as
FIREWORKS_API_KEY, and a standalone `fireloop backend` that requires it. One deployment takes
the key from the environment, one from a Secret block its config names
(`platform.api_key_secret`, which wins over the environment), both logging to W&B offline. A
third deployment carries a key in its parameters and must be refused, naming the field and the
two right places (its own decoy key is in the database by the user's doing, so it is not the
key searched for). Then every byte under the server's PREFECT_HOME (the SQLite database and its
journal), the run directories and the worker's log is searched for the planted key, as are the
runs' logs, artifacts and parameters read through the API. About two minutes: the
server migrates SQLite (~20 s) and each flow process imports torch and Prefect (~10 s).
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest

from flows.sft import sft_flow
from tests.server.runs import artifacts, deploy, logs, trigger, wait_for_terminal
from tests.server.support import (
    PlatformProcess,
    PrefectServer,
    Subprocess,
)

# The test waits for the module's servers and three flow processes: on a loaded 2-core machine
# that can pass the suite's 300 s per test.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

POOL = "fireloop-secrets"
RUN_TIMEOUT_S = 300.0
BLOCK = "fireloop-test-platform-key"
RUN: dict[str, Any] = {
    "max_steps": 2,
    "batch_size": 4,
    "checkpoint_every": 1,
    "eval_every": 0,
    "sample_eval": False,
    "flow_retries": 0,
    "wandb": {"project": "leak-test", "mode": "offline"},
}


def _leaks(root: Path, key: str) -> list[str]:
    """Every file under `root` holding `key` (UTF-8 or UTF-16)."""
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if key.encode() in data or key.encode("utf-16-le") in data:
                found.append(str(path))
    return found


def test_a_planted_key_is_written_nowhere_and_a_key_in_parameters_is_refused(
    sqlite_server: PrefectServer,
    worker: Subprocess,
    platform: PlatformProcess,
    platform_key: str,
    tmp_path: Path,
) -> None:
    from prefect.blocks.system import Secret

    with sqlite_server.settings():
        Secret(value=platform_key).save(BLOCK, overwrite=True)
    work = tmp_path / "work"
    doors = {
        "env": {"base_url": platform.base_url},
        "block": {"base_url": platform.base_url, "api_key_secret": BLOCK},
    }
    run_ids = {}
    for door, platform_part in doors.items():
        config = {"run_name": f"leak-{door}", "platform": platform_part, **RUN}
        deployment = deploy(sqlite_server, sft_flow, door, POOL, work, {"config": config})
        run_ids[door] = trigger(sqlite_server, deployment)
    decoy = f"fw-decoy-{secrets.token_hex(12)}"
    literal = {"base_url": platform.base_url, "api_key": decoy}
    refused_config = {"run_name": "leak-literal", "platform": literal, **RUN}
    refused_deployment = deploy(
        sqlite_server, sft_flow, "literal", POOL, work, {"config": refused_config}
    )
    refused = trigger(sqlite_server, refused_deployment)

    for door, run_id in run_ids.items():
        flow_run = wait_for_terminal(sqlite_server, run_id, RUN_TIMEOUT_S, worker)
        assert flow_run.state is not None and flow_run.state.is_completed(), (door, flow_run.state)
        assert (work / "runs" / f"leak-{door}" / "ledger.jsonl").is_file()
    flow_run = wait_for_terminal(sqlite_server, refused, RUN_TIMEOUT_S, worker)
    assert flow_run.state is not None and flow_run.state.is_failed()
    message = flow_run.state.message or ""
    assert "platform.api_key" in message and "api_key_secret" in message, message
    assert "FIREWORKS_API_KEY" in message and decoy not in message
    assert not (work / "runs" / "leak-literal" / "ledger.jsonl").exists()  # refused first

    assert list(work.rglob("*.wandb")), "W&B wrote no run file: the scan would prove nothing"
    assert list(sqlite_server.home.rglob("*.db")), "no database under the server's home"
    places = _leaks(sqlite_server.home, platform_key) + _leaks(work, platform_key)
    places += _leaks(worker.log_path.parent, platform_key)
    assert places == []
    with sqlite_server.client() as client:
        for run_id in (*run_ids.values(), refused):
            through_api = {
                "logs": " ".join(line.message for line in logs(sqlite_server, run_id)),
                "artifacts": " ".join(str(a.data) for a in artifacts(sqlite_server, run_id)),
                "parameters": str(client.read_flow_run(run_id).parameters),
            }
            for where, text in through_api.items():
                assert platform_key not in text, f"the key is in the {where} of {run_id}"
                assert decoy not in text or where == "parameters", where
