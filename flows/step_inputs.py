"""The durable step-inputs log: what a recipe computed or sampled for its steps, kept for resume.

SFT, DPO and ORPO batches are a pure function of the data cursor, so a replayed step rebuilds
them exactly. Some inputs are not: rollouts sampled from the policy of the moment, reference
log-probabilities that cost a forward pass on another model. A recipe writes those here, and
the write is flushed and fsync'd *before* any step trains on them, so after a crash the replay
reads what the lost attempt used instead of computing it again (sampling again would give
other rollouts; recomputing would spend the compute twice). `<run_dir>/step_inputs.jsonl` holds
one `{"key": …, "value": …}` object per line; the first entry of a key wins (it is what was
trained on), and a torn last line from a crash is cut on open. Checkpoint rows record the
log's position (its entry count), so a resume can tell when entries it relied on are gone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, Final

from flows.ledger_storage import LedgerStorage, storage_for
from flows.notices import notice

__all__ = ["STEP_INPUTS_FILENAME", "StepInputsLog"]

STEP_INPUTS_FILENAME: Final = "step_inputs.jsonl"


class StepInputsLog:
    """The log of one run directory: read once on open, then appended to."""

    def __init__(self, run_dir: str, *, filename: str = STEP_INPUTS_FILENAME) -> None:
        self._storage: LedgerStorage = storage_for(f"{run_dir.rstrip('/')}/{filename}")
        self._entries: dict[str, Any] = {}
        self._position = 0
        self._load()

    @property
    def path(self) -> str:
        return self._storage.path

    @property
    def position(self) -> int:
        """Entries in the log (lines, duplicates included): what a checkpoint row records."""
        return self._position

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Any:
        """The logged value of `key`; KeyError when it was never logged."""
        return self._entries[key]

    def append(self, entries: Mapping[str, Any]) -> None:
        """Log `entries` (key → JSON value) durably: one write, flushed and fsync'd."""
        fresh = {key: value for key, value in entries.items() if key not in self._entries}
        if not fresh:
            return
        data = "".join(
            json.dumps({"key": key, "value": value}, separators=(",", ":")) + "\n"
            for key, value in fresh.items()
        ).encode("utf-8")
        if self._storage.read() is None:
            self._storage.create(data)
        else:
            self._storage.append(data)
        self._entries.update(fresh)
        self._position += len(fresh)

    def check_position(self, recorded: int | None, what: str) -> int:
        """Say when the log holds fewer entries than `recorded` (a checkpoint row's position):
        entries the run relied on were deleted. Returns how many are missing."""
        missing = max(0, (recorded or 0) - self._position)
        if missing:
            notice(
                f"{self.path} has {self._position} entries but {what} recorded "
                f"{recorded}: {missing} are gone and will be computed again",
                level=logging.WARNING,
            )
        return missing

    def _load(self) -> None:
        data = self._storage.read()
        if not data:
            return
        kept = 0
        for line in data.splitlines(keepends=True):
            try:
                entry = json.loads(line)
                key, value = entry["key"], entry["value"]
            except (ValueError, KeyError, TypeError):
                break  # a torn last line (a crash mid-write): cut it with anything after
            if not line.endswith(b"\n"):
                break
            self._entries.setdefault(str(key), value)
            self._position += 1
            kept += len(line)
        if kept < len(data):
            self._storage.truncate(kept)
