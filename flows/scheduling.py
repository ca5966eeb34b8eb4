"""What a scheduled run needs from Prefect: its name from the scheduled start time, and the
flow retries its config asks for.

A cron deployment passes the same config every time, so a fixed `run_name` would resume (and,
once finished, return) the same run each night; `run_name_template` names each run from the
flow run's scheduled start time instead, which a flow retry and a UI retry of the same flow run
keep, so they resume the run rather than start another. The retry policy is written onto the
flow run by the flow itself, so a deployment honours `flow_retries` and `retry_delay_s` exactly
as a call from the CLI does.
"""

from __future__ import annotations

import logging
import math
import os
import re
import string
from datetime import UTC, datetime
from typing import Final
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext

__all__ = [
    "FLOW_RUN_ID_ENV",
    "RUN_NAME_PATTERN",
    "TEMPLATE_FIELDS",
    "apply_retry_policy",
    "flow_run_retries",
    "render_run_name",
    "scheduled_start_time",
    "template_run_name",
]

logger = logging.getLogger(__name__)

# A DNS label of at most 40 characters: run names become resource ids and directory names.
RUN_NAME_PATTERN: Final = r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$"
TEMPLATE_FIELDS: Final = ("scheduled", "recipe")
# Set by Prefect's workers and runners in the process that executes a flow run; the engine
# validates the flow's parameters (and so builds the config) before the run's context exists.
FLOW_RUN_ID_ENV: Final = "PREFECT__FLOW_RUN_ID"


def render_run_name(template: str, *, recipe: str, scheduled: datetime) -> str:
    """`template` with `{scheduled}` (a datetime: `{scheduled:%Y%m%d-%H%M}`) and `{recipe}`
    filled in; a `ValueError` naming `run_name_template` when it is malformed or its result is
    no valid run name."""
    problem = _template_problem(template)
    if problem is None:
        try:
            name = template.format(scheduled=scheduled, recipe=recipe)
        except (ValueError, TypeError) as exc:  # a bad format spec, e.g. `{recipe:%Y}`
            problem = f"cannot be filled in ({exc})"
        else:
            if re.fullmatch(RUN_NAME_PATTERN, name) is None:
                problem = (
                    f"gives {name!r}, not a valid run name (lowercase letters, digits and "
                    "dashes, at most 40, starting and ending with a letter or digit)"
                )
    if problem is not None:
        raise ValueError(f"run_name_template {template!r} {problem}")
    return name


def _template_problem(template: str) -> str | None:
    try:
        fields = [
            field for _, field, _, _ in string.Formatter().parse(template) if field is not None
        ]
    except ValueError as exc:  # an unmatched brace
        return f"is malformed ({exc})"
    unknown = [field for field in fields if field not in TEMPLATE_FIELDS]
    if unknown:
        return f"uses {{{unknown[0]}}}; it may use only {{scheduled}} and {{recipe}}"
    return None


def scheduled_start_time() -> datetime:
    """When the current flow run was scheduled to start (UTC), else now.

    Inside a flow run: its context's expected start time. In a process a worker or a runner
    started for a flow run, before that context exists (while the engine validates the
    parameters): the flow run read back by the id in `PREFECT__FLOW_RUN_ID`. The server sets the
    expected start time once, from the run's first state, so every attempt reads the same time.
    """
    context = FlowRunContext.get()
    expected: datetime | None = None
    if context is not None and context.flow_run is not None:
        expected = context.flow_run.expected_start_time
    elif flow_run_id := os.environ.get(FLOW_RUN_ID_ENV):
        with get_client(sync_client=True) as client:
            expected = client.read_flow_run(UUID(flow_run_id)).expected_start_time
    return (expected or datetime.now(UTC)).astimezone(UTC)


def template_run_name(template: str, recipe: str) -> str:
    """The run name `template` gives the current flow run (see `scheduled_start_time`)."""
    return render_run_name(template, recipe=recipe, scheduled=scheduled_start_time())


def apply_retry_policy(retries: int, retry_delay_s: float) -> None:
    """Write `retries` and `retry_delay_s` onto the current flow run, where Prefect's server
    reads them when the run fails (the decorator's retries are only what a run starts with).
    Outside a flow run this does nothing; an attempt that finds them written already changes
    nothing. Prefect keeps whole seconds: the delay is rounded up."""
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    delay = math.ceil(retry_delay_s)
    with get_client(sync_client=True) as client:
        policy = client.read_flow_run(context.flow_run.id).empirical_policy
        if (policy.retries, policy.retry_delay) != (retries, delay):
            policy = policy.model_copy(update={"retries": retries, "retry_delay": delay})
            client.update_flow_run(context.flow_run.id, empirical_policy=policy)
            logger.debug(
                "flow run %s: retries=%d, retry_delay=%ds", context.flow_run.id, retries, delay
            )
    context.flow_run.empirical_policy = policy


def flow_run_retries() -> int | None:
    """The retries the current flow run has (its policy, else its flow's), None outside one."""
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return None
    retries = context.flow_run.empirical_policy.retries
    if retries is None and context.flow is not None:
        retries = context.flow.retries
    return retries
