"""Serving the catalog from one long-lived process (`prefect.serve`): no work pool, no worker.

Prefect's runner polls the server for the served deployments' scheduled runs and starts each
flow run in a subprocess of its own (a fresh interpreter that imports the flow from its
entrypoint), so runs do not share module globals with the serving process or with each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from deployments.catalog import CATALOG, DeploymentSpec, deployment_named

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

__all__ = ["SERVER_HINT", "ServeError", "require_api_url", "runner_deployments", "serve_catalog"]

SERVER_HINT: Final = (
    "start one (prefect server start --host 127.0.0.1 --port 4200) and set "
    "PREFECT_API_URL=http://127.0.0.1:4200/api"
)


class ServeError(RuntimeError):
    """The catalog cannot be served: no server to serve it to, or an unknown name."""


def require_api_url() -> str:
    """The configured Prefect API URL. A served deployment lives on a server that schedules its
    runs; Prefect's temporary server (no PREFECT_API_URL) would vanish with this process."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise ServeError(
            f"serving needs a Prefect server, and PREFECT_API_URL is unset: {SERVER_HINT}"
        )
    return url


def selected(only: Sequence[str]) -> list[DeploymentSpec]:
    """The catalog, or the deployments `only` names (by name or `<flow>/<name>`)."""
    if not only:
        return list(CATALOG)
    try:
        return [deployment_named(name) for name in only]
    except KeyError as exc:
        raise ServeError(str(exc.args[0])) from None


def runner_deployments(specs: Sequence[DeploymentSpec]) -> list[RunnerDeployment]:
    """Each spec as `flow.to_deployment(...)`: its schedule, parameters, tags and limit."""
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.types.entrypoint import EntrypointType

    deployments = []
    for spec in specs:
        schedules = []
        if spec.schedule is not None:
            schedules = [CronSchedule(cron=spec.schedule.cron, timezone=spec.schedule.timezone)]
        deployments.append(
            spec.recipe_flow.load().to_deployment(
                name=spec.name,
                description=spec.description,
                parameters=spec.parameters,
                schedules=schedules,
                tags=spec.all_tags,
                concurrency_limit=spec.concurrency_limit,
                # The runner's subprocess imports the flow by module, not by a path relative
                # to the directory `fireloop serve` was started in.
                entrypoint_type=EntrypointType.MODULE_PATH,
            )
        )
    return deployments


def serve_catalog(
    only: Sequence[str], *, pause_on_shutdown: bool, limit: int | None = None
) -> None:
    """Serve the selected deployments until interrupted (see the module docstring)."""
    from prefect import serve

    require_api_url()
    serve(*runner_deployments(selected(only)), pause_on_shutdown=pause_on_shutdown, limit=limit)
