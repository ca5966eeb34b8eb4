"""What `fireloop run` shows: the run's notices, its progress bar and its summary, nothing else.

Prefect's banners and per-task lines, third-party deprecation warnings and download-style
progress bars are noise to someone watching a run; they appear only with `--verbose` (and
Prefect's lines stay in the Prefect server's log either way). The run's own lines reach the
terminal through the `fireloop.notice` logger, printed above the live progress bar.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

from rich.console import Console
from rich.text import Text

__all__ = ["NoticePrinter", "configure_output", "printing_notices"]

NOTICE_LOGGER: Final = "fireloop.notice"  # flows.notices writes here

# Read at import by Prefect, transformers, tqdm and W&B: set before any of them loads.
_QUIET_ENV: Final = {
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL",  # banners, "Finished in state ..."
    "TRANSFORMERS_VERBOSITY": "error",
    "TQDM_DISABLE": "1",  # download-style progress bars
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "WANDB_SILENT": "true",
}
_NOISY_WARNINGS: Final = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def configure_output(*, verbose: bool) -> None:
    """Quiet third-party output unless `verbose`; settings the user made win."""
    if verbose:
        return
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for category in _NOISY_WARNINGS:
        warnings.filterwarnings("ignore", category=category)


class NoticePrinter(logging.Handler):
    """Prints `fireloop.notice` records as plain text (never rich markup) on the console."""

    def __init__(self, console: Console) -> None:
        super().__init__(logging.INFO)
        self.console = console
        self.addFilter(lambda record: record.name == NOTICE_LOGGER)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            style = "yellow" if record.levelno >= logging.WARNING else ""
            self.console.print(Text(record.getMessage(), style=style), soft_wrap=True)
        except Exception:  # a display failure must not break the run
            self.handleError(record)


@contextmanager
def printing_notices(console: Console) -> Iterator[NoticePrinter]:
    """Print the run's notices on `console` for the block.

    The printer sits on the root logger, beside Prefect's console handler, so the run's secret
    redaction (installed on the root logger's handlers) masks what it prints too. Enter it
    after Prefect is imported: Prefect's logging setup replaces the root logger's handlers.
    """
    notices = logging.getLogger(NOTICE_LOGGER)
    previous_level = notices.level
    notices.setLevel(logging.INFO)  # the root logger passes only warnings
    printer = NoticePrinter(console)
    root = logging.getLogger()
    # Prefect's console handler (shown with --verbose) would print each notice a second time.
    others = [handler for handler in root.handlers if isinstance(handler, logging.StreamHandler)]
    for handler in others:
        handler.addFilter(_not_a_notice)
    root.addHandler(printer)
    try:
        yield printer
    finally:
        root.removeHandler(printer)
        for handler in others:
            handler.removeFilter(_not_a_notice)
        notices.setLevel(previous_level)


def _not_a_notice(record: logging.LogRecord) -> bool:
    return record.name != NOTICE_LOGGER
