"""One-line notices a run shows its user: dataset summary, cadence points, resume hints.

The CLI is quiet by default (no Prefect banners or per-task lines), so what a person must see
goes through this one channel: the stdlib logger `fireloop.notice`, which the CLI prints, and,
inside a flow or task run, Prefect's run logger as well, so the same line is in the Prefect UI.
"""

from __future__ import annotations

import logging
from typing import Final

__all__ = ["NOTICE_LOGGER", "notice"]

NOTICE_LOGGER: Final = "fireloop.notice"
_notices = logging.getLogger(NOTICE_LOGGER)


def notice(message: str, *, level: int = logging.INFO) -> None:
    """Show `message` to the person running the flow (CLI) and record it in Prefect's logs."""
    _notices.log(level, message)
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return
    from prefect import get_run_logger

    get_run_logger().log(level, message)
