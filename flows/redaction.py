"""Secrets never reach a log: every record is masked of the run's keys, whatever handler gets it.

Prefect masks only its own API key. While a run holds secrets, two layers mask them: a log
record factory masks each record as it is created, so handlers added later during the run (W&B's,
a library's) see only masked records; and `RedactSecrets` sits on every handler that exists when
the run starts (every logger's, not a fixed list), for records built without the factory
(`logging.makeLogRecord`). Handlers, not loggers: a logger's filter misses records propagated
from child loggers. The message, its arguments and the formatted exception are all masked; no
record is dropped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, Final

__all__ = ["REDACTED", "RedactSecrets", "redact_secrets"]

REDACTED: Final = "***"
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
_factory_guard = threading.Lock()
_factory_installed = False


def _handlers() -> list[logging.Handler]:
    """Every handler of every logger that exists now, the root logger's included."""
    loggers: list[logging.Logger] = [logging.getLogger()]
    loggers += [
        logger
        for logger in list(logging.Logger.manager.loggerDict.values())
        if isinstance(logger, logging.Logger)
    ]
    handlers: list[logging.Handler] = []
    for logger in loggers:
        for handler in list(logger.handlers):
            if handler not in handlers:
                handlers.append(handler)
    return handlers


def _install_record_factory() -> None:
    """Wrap the log record factory once, so every record is masked when it is created."""
    global _factory_installed
    with _factory_guard:
        if _factory_installed:
            return
        make_record = logging.getLogRecordFactory()

        def masked_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = make_record(*args, **kwargs)
            # A malformed message fails later in its handler, as it would unmasked.
            with suppress(Exception):
                _FILTER.filter(record)
            return record

        logging.setLogRecordFactory(masked_record)
        _factory_installed = True


@contextmanager
def redact_secrets(secrets: Iterable[str]) -> Iterator[RedactSecrets]:
    """Mask `secrets` in every log record for the duration of the block."""
    added = _FILTER.add(secrets)
    _install_record_factory()
    for handler in _handlers():
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
    try:
        yield _FILTER
    finally:
        _FILTER.remove(added)
