"""The run ledger: the append-only JSONL at `<run_dir>/ledger.jsonl` that resume trusts.

The ledger is the truth about a run; Prefect state is advisory. Line 1 is the run header; every
later row records something already durable (a checkpoint saved and read back, a verified
hotload, an evaluation) and a checkpoint row names the *next* step and the raw-row data cursor
after its step (see docs/architecture.md, "Resume"). A ledger of another run
is refused before any compute and never touched, unless it recorded nothing yet or the run is
deliberately extended to more steps. `run_dir` is a local path or any fsspec URL.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, ClassVar, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from flows.ledger_storage import LedgerStorage, storage_for

logger = logging.getLogger(__name__)

LEDGER_FILENAME: Final = "ledger.jsonl"
# Header fields that identify a run: a ledger whose header differs in any of them is another
# run's. `time` is deliberately absent: a retry opens the same run later.
IDENTITY_FIELDS: Final = (
    "run_id",
    "recipe",
    "config_hash",
    "base_model",
    "tokenizer_model",
    "renderer_name",
    "lora_rank",
    "dataset_fingerprint",
)


class LedgerError(Exception):
    """Base of ledger failures; none is retryable (a retry would meet the same file)."""

    retryable: ClassVar[bool] = False


@dataclass(frozen=True)
class FieldDifference:
    """One identity field (or, inside `config_hash`, one config field) that differs."""

    field: str
    existing: object
    requested: object

    def __str__(self) -> str:
        return f"{self.field} is {self.existing!r} in the ledger but {self.requested!r} here"


class LedgerMismatchError(LedgerError, ValueError):
    """The ledger in `run_dir` belongs to another run: every field in `differences` differs.

    `config_fields` lists the training config fields behind a `config_hash` difference (empty
    when the ledger predates recorded configs); `hint` says what to do about it.
    """

    def __init__(
        self,
        path: str,
        differences: tuple[FieldDifference, ...],
        config_fields: tuple[FieldDifference, ...] = (),
        hint: str = "",
    ) -> None:
        self.path, self.differences = path, differences
        self.config_fields, self.hint = config_fields, hint
        self.field = differences[0].field if differences else ""
        shown = [str(d) for d in differences if not (d.field == "config_hash" and config_fields)]
        if config_fields:
            shown.append("config fields differ: " + "; ".join(str(d) for d in config_fields))
        advice = hint or "use another run_name or run_dir, or the original config"
        super().__init__(f"{path} belongs to another run: {'; '.join(shown)}. {advice}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.differences, self.config_fields, self.hint))


class LedgerCorruptError(LedgerError):
    """A ledger line other than a torn last line does not parse, or line 1 is no header."""


def _now() -> datetime:
    return datetime.now(UTC)


class _Row(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    time: datetime = Field(default_factory=_now)


class RunHeader(_Row):
    """Line 1: which run this ledger belongs to (`time` = when it was created)."""

    kind: Literal["run"] = "run"
    run_id: str = Field(min_length=1)
    recipe: str = Field(min_length=1)
    config_hash: str = Field(min_length=1)
    base_model: str = Field(min_length=1)
    tokenizer_model: str = Field(min_length=1)
    renderer_name: str | None = None
    lora_rank: int = Field(ge=0)
    dataset_fingerprint: str = Field(min_length=1)
    # The config fields `config_hash` covers (no secrets: the platform block is run-only), so a
    # later mismatch can name the fields that differ. Ledgers written before it lack it.
    training_config: dict[str, Any] | None = None


class CheckpointRow(_Row):
    """A saved checkpoint, appended only after the save completed and its name was read back.

    `step` is the 0-based optimizer step just completed and `next_step = step + 1` the one to
    run after loading it; `data_cursor` counts raw rows consumed after `step`, dropped rows
    included, so a resume neither replays nor skips a row. The run's identity fields are
    repeated so a resume re-resolves them from the row rather than from defaults.
    """

    kind: Literal["checkpoint"] = "checkpoint"
    # The server's name: a trainer may store a save under another name than requested.
    name: str = Field(min_length=1)
    requested_name: str | None = None
    step: int = Field(ge=0)
    next_step: int = Field(ge=1)
    data_cursor: int = Field(ge=0)
    epoch: int = Field(ge=0)
    state_path: str = Field(min_length=1)  # what `load_state_with_optimizer` takes
    job_id: str | None = None
    snapshot_identity: str | None = None  # sampler snapshot saved with it, if any
    resumable: bool = True
    promotable: bool = False
    wandb_run_id: str | None = None
    # Entries in the run's step-inputs log when the checkpoint was taken (None: the recipe
    # keeps no log, its inputs being a function of the data cursor).
    inputs_position: int | None = Field(default=None, ge=0)
    config_hash: str
    base_model: str
    tokenizer_model: str
    renderer_name: str | None = None
    lora_rank: int = Field(ge=0)
    dataset_fingerprint: str

    @model_validator(mode="after")
    def _next_step_follows_step(self) -> CheckpointRow:
        if self.next_step != self.step + 1:
            raise ValueError(f"next_step must be step + 1, got {self.step=} {self.next_step=}")
        return self


# The identity fields a checkpoint row repeats from the header.
_CHECKPOINT_IDENTITY: Final = tuple(f for f in IDENTITY_FIELDS if f in CheckpointRow.model_fields)


class HotloadRow(_Row):
    """A hotload whose snapshot identity the deployment was seen serving (`verified`)."""

    kind: Literal["hotload"] = "hotload"
    identity: str = Field(min_length=1)
    deployment: str = Field(min_length=1)
    verified: bool
    step: int | None = Field(default=None, ge=0)
    # `base` (a full load: every session's first, since a new session starts a new chain) or
    # `delta` (against the previous one).
    checkpoint_type: Literal["base", "delta", "merged_base"] | None = None


class EvaluationRow(_Row):
    """Evaluation metrics at `step` (the weights before that step ran, tinker convention)."""

    kind: Literal["evaluation"] = "evaluation"
    step: int = Field(ge=0)
    metrics: dict[str, float]


class ExtensionRow(_Row):
    """The run was deliberately continued to more steps (`extend`): from this row on, its
    identity is `config_hash` / `training_config` here, which differ from the previous ones
    in `max_steps` only."""

    kind: Literal["extension"] = "extension"
    previous_max_steps: int = Field(ge=1)
    max_steps: int = Field(ge=1)
    config_hash: str = Field(min_length=1)
    training_config: dict[str, Any]


class RunEndRow(_Row):
    """The run finished its loop and final save."""

    kind: Literal["run_end"] = "run_end"
    next_step: int = Field(ge=0)
    data_cursor: int = Field(ge=0)


AttemptOutcome = Literal["crashed", "cancelled", "interrupted"]


class AttemptEndRow(_Row):
    """An attempt ended by a signal, not by the run's own code: a crash (SIGTERM, eviction),
    a cancel from the Prefect UI or API, or Ctrl-C. Prefect retries none of them.

    `teardown` is `deferred`: the trainer job and deployment are kept, so running the same
    config again resumes from `next_step` (the last resumable checkpoint's; 0: none yet); the
    teardown policy is applied when a later attempt completes the run. Readers that resume
    or report skip this row: it records no progress, only why the attempt stopped.
    """

    kind: Literal["attempt_end"] = "attempt_end"
    outcome: AttemptOutcome
    teardown: Literal["deferred"] = "deferred"
    reason: str = Field(min_length=1)
    next_step: int = Field(ge=0)
    flow_run_id: str | None = None


LedgerRow = Annotated[
    RunHeader
    | CheckpointRow
    | HotloadRow
    | EvaluationRow
    | ExtensionRow
    | RunEndRow
    | AttemptEndRow,
    Field(discriminator="kind"),
]
_ROW: Final[TypeAdapter[LedgerRow]] = TypeAdapter(LedgerRow)


def config_hash(config: BaseModel) -> str:
    """`sha256:<hex>` of the config's canonical JSON (sorted keys, no whitespace)."""
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def ledger_path(run_dir: str | Path) -> str:
    """Where the ledger of `run_dir` lives (as given: a path or URL)."""
    return f"{str(run_dir).rstrip('/')}/{LEDGER_FILENAME}"


@dataclass(frozen=True)
class _Parsed:
    rows: list[LedgerRow]
    valid_bytes: int  # length of the prefix that holds complete rows
    torn: bytes  # an unparseable unterminated last line (a crash mid-append), else b""
    unterminated: bool  # the last row parsed but lacks its newline


def _parse(data: bytes, where: str) -> _Parsed:
    """Rows of a ledger file; only a torn *last* line is tolerated (with a warning)."""
    rows: list[LedgerRow] = []
    offset = 0
    lines = data.split(b"\n")
    for number, line in enumerate(lines, start=1):
        is_last = number == len(lines)
        if is_last and not line:  # the file ended with a newline
            break
        if not line.strip():
            offset += len(line) + (0 if is_last else 1)
            continue
        try:
            row = _ROW.validate_json(line)
        except ValidationError as exc:
            if is_last:
                logger.warning("%s:%d: ignoring a torn last line (crash mid-append)", where, number)
                return _Parsed(rows, offset, line, unterminated=False)
            detail = exc.errors()[0]
            raise LedgerCorruptError(
                f"{where}:{number}: malformed ledger row ({detail['msg']} at {detail['loc']})"
            ) from None
        if isinstance(row, RunHeader) and rows:
            raise LedgerCorruptError(f"{where}:{number}: a second run header")
        rows.append(row)
        offset += len(line) + (0 if is_last else 1)
        if is_last:
            return _Parsed(rows, offset, b"", unterminated=True)
    return _Parsed(rows, offset, b"", unterminated=False)


def read_ledger(run_dir: str | Path) -> list[LedgerRow]:
    """Every complete row of the ledger in `run_dir` ([] when there is none); read-only."""
    path = ledger_path(run_dir)
    data = storage_for(path).read()
    return [] if data is None else _parse(data, path).rows


class Ledger:
    """An open run ledger: its rows (read at open, then appended) and durable appends.

    One writer per run (the run's flow); rows are never rewritten, only appended.
    """

    def __init__(self, storage: LedgerStorage, header: RunHeader, rows: list[LedgerRow]) -> None:
        self._storage = storage
        self.header = header  # this run's identity; new rows are stamped with it
        self._rows = rows

    @classmethod
    def open(cls, run_dir: str | Path, header: RunHeader, *, extend: bool = False) -> Ledger:
        """Create the ledger of `run_dir`, or reopen it if its header is this run's.

        A ledger of another run (any of `IDENTITY_FIELDS` differs) raises `LedgerMismatchError`
        naming every difference, and the file is left untouched, with two exceptions: a ledger
        that holds only its header (an attempt that failed before recording anything) gets this
        run's header instead, and with `extend` a run whose config differs in a larger
        `max_steps` only is continued, with an `ExtensionRow` recording its new identity.
        A torn last line is moved to `ledger.jsonl.torn-<time>` beside it.
        """
        storage = storage_for(ledger_path(run_dir))
        data = storage.read()
        if data is None:
            storage.create(_line(header))
            logger.info("created ledger %s for run %s", storage.path, header.run_id)
            return cls(storage, header, [header])
        parsed = _parse(data, storage.path)
        if not parsed.rows:  # an empty or torn-only file: the header write never completed
            _repair_tail(storage, parsed)
            storage.append(_line(header))
            return cls(storage, header, [header])
        existing = _identity(storage.path, parsed.rows)
        differences = _differences(existing, header)
        if differences and len(parsed.rows) == 1:
            # Nothing was trained or recorded under the old header: the corrected rerun of a
            # failed attempt takes the file over.
            storage.truncate(0)
            storage.append(_line(header))
            logger.warning("%s recorded nothing; replaced its header with this run's", storage.path)
            return cls(storage, header, [header])
        extension = _extension(storage.path, existing, header, differences, extend=extend)
        _repair_tail(storage, parsed)
        rows = parsed.rows
        if extension is not None:
            storage.append(_line(extension))
            rows = [*rows, extension]
            logger.warning(
                "%s: run extended from %d to %d steps",
                storage.path,
                extension.previous_max_steps,
                extension.max_steps,
            )
        logger.info("reopened ledger %s (%d rows)", storage.path, len(rows))
        return cls(storage, header, rows)

    @property
    def path(self) -> str:
        return self._storage.path

    @property
    def rows(self) -> tuple[LedgerRow, ...]:
        """Every row, the header first, in file order."""
        return tuple(self._rows)

    def append(self, row: LedgerRow) -> None:
        """Append one row durably; append it only once what it records is durable."""
        if isinstance(row, RunHeader):
            raise ValueError("the run header is written by Ledger.open only")
        if isinstance(row, CheckpointRow):
            for field in _CHECKPOINT_IDENTITY:
                if getattr(row, field) != getattr(self.header, field):
                    raise ValueError(f"checkpoint row {field} differs from this run's header")
        self._storage.append(_line(row))
        self._rows.append(row)

    def append_checkpoint(
        self,
        *,
        name: str,
        step: int,
        data_cursor: int,
        epoch: int,
        state_path: str,
        **extra: Any,
    ) -> CheckpointRow:
        """Append a checkpoint row stamped with this run's identity; `next_step = step + 1`.

        `extra`: the optional `CheckpointRow` fields (`requested_name`, `job_id`,
        `snapshot_identity`, `resumable`, `promotable`, `wandb_run_id`, `inputs_position`).
        """
        identity = {field: getattr(self.header, field) for field in _CHECKPOINT_IDENTITY}
        row = CheckpointRow(
            name=name,
            step=step,
            next_step=step + 1,
            data_cursor=data_cursor,
            epoch=epoch,
            state_path=state_path,
            **identity,
            **extra,
        )
        self.append(row)
        return row

    def checkpoints(self, *, resumable_only: bool = True) -> list[CheckpointRow]:
        """Checkpoint rows in file order (by default only resumable ones)."""
        return [
            row
            for row in self._rows
            if isinstance(row, CheckpointRow) and (row.resumable or not resumable_only)
        ]

    def last_checkpoint(self, available: Collection[str] | None = None) -> CheckpointRow | None:
        """The newest resumable checkpoint row, or None for a fresh start.

        With `available` (the checkpoint names the trainer job lists), rows naming a checkpoint
        the job does not have are skipped in favour of older ones (a checkpoint the job lost
        cannot be loaded).
        """
        for row in reversed(self.checkpoints()):
            if available is None or row.name in available:
                return row
            logger.warning("ledger checkpoint %s is not listed by the trainer; skipped", row.name)
        return None


def _line(row: BaseModel) -> bytes:
    return (row.model_dump_json() + "\n").encode("utf-8")


def _identity(path: str, rows: list[LedgerRow]) -> RunHeader:
    """The run's current identity: its header, updated by its latest `ExtensionRow`."""
    header = rows[0]
    if not isinstance(header, RunHeader):
        raise LedgerCorruptError(f"{path}:1: expected the run header, got a {header.kind!r} row")
    extensions = [row for row in rows if isinstance(row, ExtensionRow)]
    if not extensions:
        return header
    last = extensions[-1]
    update = {"config_hash": last.config_hash, "training_config": last.training_config}
    return header.model_copy(update=update)


def _differences(existing: RunHeader, requested: RunHeader) -> tuple[FieldDifference, ...]:
    return tuple(
        FieldDifference(field, getattr(existing, field), getattr(requested, field))
        for field in IDENTITY_FIELDS
        if getattr(existing, field) != getattr(requested, field)
    )


def _config_differences(existing: RunHeader, requested: RunHeader) -> tuple[FieldDifference, ...]:
    """The training config fields behind a `config_hash` difference (nested: dotted names)."""
    if existing.training_config is None or requested.training_config is None:
        return ()
    return tuple(_diff(existing.training_config, requested.training_config, prefix=""))


def _diff(old: dict[str, Any], new: dict[str, Any], prefix: str) -> list[FieldDifference]:
    found: list[FieldDifference] = []
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            found.extend(_diff(before, after, prefix=f"{prefix}{key}."))
        elif before != after:
            found.append(FieldDifference(prefix + key, before, after))
    return found


_EXTEND_HINT: Final = (
    "to continue this run to more steps, run it again with extend=true "
    "(every other training field unchanged)"
)


def _extension(
    path: str,
    existing: RunHeader,
    requested: RunHeader,
    differences: tuple[FieldDifference, ...],
    *,
    extend: bool,
) -> ExtensionRow | None:
    """The row that extends the run to `requested`, None if nothing differs; else raise."""
    if not differences:
        return None
    config_fields = _config_differences(existing, requested)
    old_steps = (existing.training_config or {}).get("max_steps")
    new_steps = (requested.training_config or {}).get("max_steps")
    only_more_steps = (
        [d.field for d in differences] == ["config_hash"]
        and [d.field for d in config_fields] == ["max_steps"]
        and isinstance(old_steps, int)
        and isinstance(new_steps, int)
        and new_steps > old_steps
    )
    schedule = (existing.training_config or {}).get("lr_schedule", "constant")
    if only_more_steps and schedule != "constant":
        hint = (
            f"extend needs lr_schedule constant: a {schedule!r} schedule is laid out over "
            "max_steps, so more steps would change the rates of the steps already trained; "
            "start a new run instead"
        )
        raise LedgerMismatchError(path, differences, config_fields, hint)
    if only_more_steps and extend:
        assert isinstance(old_steps, int) and isinstance(new_steps, int)
        assert requested.training_config is not None
        return ExtensionRow(
            previous_max_steps=old_steps,
            max_steps=new_steps,
            config_hash=requested.config_hash,
            training_config=requested.training_config,
        )
    raise LedgerMismatchError(
        path, differences, config_fields, _EXTEND_HINT if only_more_steps else ""
    )


def _repair_tail(storage: LedgerStorage, parsed: _Parsed) -> None:
    """Set a torn last line aside and cut it off, or end an unterminated last row."""
    if parsed.torn:
        stamp = _now().strftime("%Y%m%dT%H%M%S%fZ")
        aside = storage.write_aside(f".torn-{stamp}", parsed.torn)
        storage.truncate(parsed.valid_bytes)
        logger.warning("%s: moved a torn last line to %s", storage.path, aside)
    elif parsed.unterminated:
        storage.append(b"\n")
