"""Durable state of the local platform: trainer jobs, deployments and checkpoint rows in SQLite.

Why SQLite: a state change (a job's transition, a 409 check-and-insert) is one transaction, so it
is atomic even with concurrent requests; the file survives a platform restart, which is how the
local platform keeps its jobs and checkpoints like the real one; and it is in the
standard library. Jobs and deployments are pydantic documents stored as JSON under an indexed id
(the services own their schema); checkpoint rows have columns because they are paged in order.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

DocumentKind = Literal["trainer_jobs", "deployments"]
M = TypeVar("M", bound=BaseModel)

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS trainer_jobs (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS deployments (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    name TEXT NOT NULL,
    checkpoint_type TEXT NOT NULL,
    promotable INTEGER NOT NULL,
    create_time REAL NOT NULL,
    update_time REAL NOT NULL,
    UNIQUE (job_id, name)
);
CREATE INDEX IF NOT EXISTS checkpoints_by_job ON checkpoints (job_id, seq);
"""
_CHECKPOINT_COLUMNS = (
    "seq",
    "job_id",
    "name",
    "checkpoint_type",
    "promotable",
    "create_time",
    "update_time",
)


class CheckpointRow(BaseModel):
    """One checkpoint row of a trainer job; `seq` is the insertion order (oldest first)."""

    model_config = ConfigDict(frozen=True)

    seq: int
    job_id: str
    name: str
    checkpoint_type: str
    promotable: bool
    create_time: float
    update_time: float


class Store:
    """One SQLite connection (WAL) shared by all request threads behind one re-entrant lock."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # isolation_level=None: no implicit transactions; `transaction()` issues BEGIN/COMMIT.
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.RLock()
        self._depth = 0
        self._after_commit: list[Callable[[], None]] = []
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable against a crash of the process (not of the OS) in WAL mode.
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(_SCHEMA)
            self._conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Hold the lock and one SQLite transaction; nested uses join the outer one."""
        committed: list[Callable[[], None]] = []
        with self._lock:
            outermost = self._depth == 0
            if outermost:
                self._conn.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if outermost:
                    self._conn.execute("ROLLBACK")
                    self._after_commit.clear()
                raise
            self._depth -= 1
            if outermost:
                self._conn.execute("COMMIT")
                committed, self._after_commit = self._after_commit, []
        for callback in committed:
            callback()

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run `callback` once the current transaction commits, outside the lock.

        Hooks run there (a trainer dropping a lost job's state, say), so they can never
        deadlock against another thread waiting for the store; a rollback discards them.
        """
        with self._lock:
            if self._depth == 0:
                raise RuntimeError("after_commit needs an open transaction")
            self._after_commit.append(callback)

    def documents(self, kind: DocumentKind, model: type[M]) -> DocumentTable[M]:
        """The table of `kind`, read and written as `model` documents."""
        return DocumentTable(self, kind, model)

    def fetch(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        """Run a query and read all its rows while holding the lock."""
        with self.transaction():
            return self._conn.execute(sql, params).fetchall()

    def write(self, sql: str, params: tuple[object, ...] = ()) -> int:
        """Run one statement inside a transaction; the number of rows it changed."""
        with self.transaction():
            return self._conn.execute(sql, params).rowcount

    def upsert_checkpoint(
        self, job_id: str, name: str, checkpoint_type: str, promotable: bool, now: float
    ) -> CheckpointRow:
        """Insert a row, or update type and time of an existing `(job_id, name)` in place."""
        with self.transaction():
            self.write(
                "INSERT INTO checkpoints"
                " (job_id, name, checkpoint_type, promotable, create_time, update_time)"
                " VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (job_id, name) DO UPDATE SET"
                " checkpoint_type = excluded.checkpoint_type,"
                " promotable = excluded.promotable, update_time = excluded.update_time",
                (job_id, name, checkpoint_type, int(promotable), now, now),
            )
            rows = self._checkpoint_rows("job_id = ? AND name = ?", (job_id, name), 1)
        return rows[0]

    def list_checkpoints(self, job_id: str, after_seq: int, limit: int) -> list[CheckpointRow]:
        """Up to `limit` rows of a job with `seq > after_seq`, oldest first."""
        return self._checkpoint_rows("job_id = ? AND seq > ?", (job_id, after_seq), limit)

    def _checkpoint_rows(
        self, where: str, params: tuple[object, ...], limit: int
    ) -> list[CheckpointRow]:
        rows = self.fetch(
            f"SELECT {', '.join(_CHECKPOINT_COLUMNS)}"
            f" FROM checkpoints WHERE {where} ORDER BY seq LIMIT ?",
            (*params, limit),
        )
        return [
            CheckpointRow.model_validate(dict(zip(_CHECKPOINT_COLUMNS, row, strict=True)))
            for row in rows
        ]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class DocumentTable(Generic[M]):
    """Pydantic documents of one kind, stored as JSON under their id, in insertion order."""

    def __init__(self, store: Store, kind: DocumentKind, model: type[M]) -> None:
        self._store = store
        self._kind = kind
        self._model = model

    def get(self, doc_id: str) -> M | None:
        rows = self._store.fetch(f"SELECT doc FROM {self._kind} WHERE id = ?", (doc_id,))
        return self._model.model_validate_json(rows[0][0]) if rows else None

    def insert(self, doc_id: str, doc: M) -> bool:
        """Insert unless the id exists (atomically); False when it did."""
        changed = self._store.write(
            f"INSERT OR IGNORE INTO {self._kind} (id, doc) VALUES (?, ?)",
            (doc_id, doc.model_dump_json()),
        )
        return changed == 1

    def replace(self, doc_id: str, doc: M) -> None:
        changed = self._store.write(
            f"UPDATE {self._kind} SET doc = ? WHERE id = ?", (doc.model_dump_json(), doc_id)
        )
        if changed != 1:
            raise KeyError(f"{self._kind}: no document {doc_id!r} to replace")

    def delete(self, doc_id: str) -> bool:
        return self._store.write(f"DELETE FROM {self._kind} WHERE id = ?", (doc_id,)) == 1

    def all(self) -> list[M]:
        """Every document, oldest first."""
        rows = self._store.fetch(f"SELECT doc FROM {self._kind} ORDER BY rowid")
        return [self._model.model_validate_json(row[0]) for row in rows]
