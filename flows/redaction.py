"""Secrets never reach a log: a filter on every handler that masks the run's keys.

Prefect masks only its own API key, so a flow installs `RedactSecrets` on the
handlers that ship records anywhere (Prefect's `api` and `console` handlers, the root logger's,
pytest's or W&B's if present) for as long as it runs. Handlers, not loggers: a logger's filter
misses records propagated from child loggers. The message, its arguments and the formatted
exception are all masked; the filter never drops a record.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Final

__all__ = ["REDACTED", "RedactSecrets", "redact_secrets"]

REDACTED: Final = "***"
# Where records leave the process: the root logger, Prefect's run loggers (api handler) and
# Prefect's own logger (console handler).
_LOGGER_NAMES: Final = ("", "prefect", "prefect.flow_runs", "prefect.task_runs", "prefect.extra")
_MIN_SECRET_CHARS: Final = 8  # shorter strings would mask ordinary words


class RedactSecrets(logging.Filter):
    """Replaces every registered secret in a record by `***` (message, args, traceback)."""

    def __init__(self) -> None:
        super().__init__("fireloop-redact-secrets")
        self._lock = threading.Lock()
        self._secrets: dict[str, int] = {}  # secret -> number of active registrations

    def add(self, secrets: Iterable[str]) -> list[str]:
        """Register secrets (too-short strings are ignored); the ones registered."""
        added = [s for s in secrets if len(s) >= _MIN_SECRET_CHARS]
        with self._lock:
            for secret in added:
                self._secrets[secret] = self._secrets.get(secret, 0) + 1
        return added

    def remove(self, secrets: Iterable[str]) -> None:
        with self._lock:
            for secret in secrets:
                count = self._secrets.get(secret, 0) - 1
                if count > 0:
                    self._secrets[secret] = count
                else:
                    self._secrets.pop(secret, None)

    def redact(self, text: str) -> str:
        with self._lock:
            secrets = sorted(self._secrets, key=len, reverse=True)  # longest first
        for secret in secrets:
            text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        message = record.getMessage()
        redacted = self.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        if record.exc_info and not record.exc_text:
            # Format the traceback now, masked; formatters reuse `exc_text` when it is set.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        return True


_FILTER: Final = RedactSecrets()


def _handlers() -> list[logging.Handler]:
    handlers: list[logging.Handler] = []
    for name in _LOGGER_NAMES:
        for handler in logging.getLogger(name).handlers:
            if handler not in handlers:
                handlers.append(handler)
    return handlers


@contextmanager
def redact_secrets(secrets: Iterable[str]) -> Iterator[RedactSecrets]:
    """Mask `secrets` on every shipping handler for the duration of the block."""
    added = _FILTER.add(secrets)
    for handler in _handlers():
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
    try:
        yield _FILTER
    finally:
        _FILTER.remove(added)
