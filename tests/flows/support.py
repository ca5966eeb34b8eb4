"""Reading back what a flow run left behind: its Prefect record, logs, artifacts and files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import torch
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun, State
from prefect.logging.handlers import APILogWorker
from safetensors.torch import load_file

from backend import LocalPlatform
from flows.ledger import CheckpointRow, Ledger, RunHeader, read_ledger


@dataclass(frozen=True)
class RunRecord:
    """A flow run as the Prefect server stored it."""

    flow_run: FlowRun
    logs: str
    artifacts: list[dict[str, Any]]

    @property
    def run_count(self) -> int:
        return self.flow_run.run_count

    def artifact(self, suffix: str) -> dict[str, Any]:
        """The latest artifact whose key ends with `suffix`."""
        matching = [a for a in self.artifacts if (a["key"] or "").endswith(suffix)]
        assert matching, f"no artifact *{suffix} in {[a['key'] for a in self.artifacts]}"
        return max(matching, key=lambda a: a["updated"])


def flow_run_id(state: State[Any]) -> UUID:
    run_id = state.state_details.flow_run_id
    assert run_id is not None
    return run_id


def read_run(state: State[Any]) -> RunRecord:
    """The stored flow run of `state`, with every log line and artifact it produced."""
    APILogWorker.drain_all(timeout=10)  # logs are shipped in batches
    run_id = flow_run_id(state)
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(run_id)
        log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))
        logs: list[Any] = []
        while page := client.read_logs(log_filter=log_filter, limit=200, offset=len(logs)):
            logs.extend(page)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    return RunRecord(
        flow_run=flow_run,
        logs="\n".join(log.message for log in logs),
        artifacts=[artifact.model_dump(mode="json") for artifact in artifacts],
    )


def files_text(root: Path) -> str:
    """Every file under `root`, decoded leniently (binary W&B logs included)."""
    chunks = [
        path.read_bytes().decode("utf-8", errors="replace")
        for path in sorted(root.rglob("*"))
        if path.is_file()
    ]
    return "\n".join(chunks)


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def write_foreign_ledger(run_dir: Path) -> None:
    """A ledger of another run in `run_dir`, with one checkpoint row."""
    other = RunHeader(
        run_id="someone-else",
        recipe="sft",
        config_hash="sha256:other",
        base_model="fireloop/tiny",
        tokenizer_model="fireloop/tiny",
        lora_rank=0,
        dataset_fingerprint="sha256:other-data",
    )
    ledger = Ledger.open(run_dir, other)
    ledger.append_checkpoint(name="step-5", step=4, data_cursor=80, epoch=0, state_path="step-5")


def preempt_during_save(
    platform: LocalPlatform, name: str, monkeypatch: pytest.MonkeyPatch
) -> list[str]:
    """Preempt the job once, while the trainer writes checkpoint `name`: its files are
    written, the control plane has not published it yet and the client gets no answer.
    Returns the list the preempted job id is appended to when it fires."""
    original = platform.state.record_checkpoint
    fired: list[str] = []

    def record_checkpoint(job_id: str, checkpoint: str, kind: Any) -> Any:
        if checkpoint == name and not fired:
            fired.append(job_id)
            platform.preempt(job_id)
        return original(job_id, checkpoint, kind)

    monkeypatch.setattr(platform.state, "record_checkpoint", record_checkpoint)
    return fired


def final_state(platform: LocalPlatform, run_dir: Path, steps: int) -> dict[str, Any]:
    """The weights and optimizer state of the run's last checkpoint (after `steps` steps)."""
    rows = [row for row in read_ledger(run_dir) if isinstance(row, CheckpointRow)]
    assert rows[-1].job_id is not None and rows[-1].next_step == steps
    files = platform.data_dir / "jobs" / rows[-1].job_id / "checkpoints" / rows[-1].name
    return {
        part: load_file(files / part) for part in ("weights.safetensors", "optimizer.safetensors")
    }


def assert_bitwise_equal(want: dict[str, Any], got: dict[str, Any]) -> None:
    """Two `final_state`s hold the same tensors, bit for bit."""
    for part, tensors in want.items():
        assert tensors.keys() == got[part].keys(), part
        assert all(torch.equal(tensors[name], got[part][name]) for name in tensors), part


def sft_header(run_id: str) -> RunHeader:
    """A ledger header of a tiny SFT run, for tests that drive the ledger and monitor by hand."""
    return RunHeader(
        run_id=run_id,
        recipe="sft",
        config_hash="sha256:x",
        base_model="fireloop/tiny",
        tokenizer_model="fireloop/tiny",
        lora_rank=0,
        dataset_fingerprint="sha256:y",
    )
