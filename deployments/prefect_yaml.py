"""`prefect.yaml`, generated from the catalog: the file `prefect deploy --all` reads is never
edited by hand, so the served and the deployed set cannot drift apart (a test compares the
committed file with this rendering)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import yaml

from deployments.catalog import CATALOG, PREFECT_VERSION, WORK_POOL, DeploymentSpec

__all__ = ["HEADER", "PREFECT_YAML", "prefect_yaml_data", "render_prefect_yaml"]

PREFECT_YAML: Final = Path(__file__).resolve().parents[1] / "prefect.yaml"
HEADER: Final = """\
# Generated from deployments/catalog.py by `fireloop deployments yaml --write`: edit the
# catalog, then regenerate (a test fails while this file differs from the rendering).
#
#   prefect work-pool create fireloop --type process
#   prefect --no-prompt deploy --all        # from the repository root
#   prefect worker start --pool fireloop    # from the repository root, in the project's venv
#
# No `pull` section: `prefect deploy` then stores a set_working_directory step naming the
# directory it ran in (the repository root), where the process worker's flow runs import the
# entrypoints and keep their run directories (runs/<run name>).
"""


def _deployment(spec: DeploymentSpec) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": spec.name,
        "description": spec.description,
        "entrypoint": spec.recipe_flow.entrypoint,
        "tags": spec.all_tags,
        "parameters": spec.parameters,
        "schedules": [],
        "concurrency_limit": {"limit": 1, "collision_strategy": spec.concurrency.value},
        "work_pool": {"name": WORK_POOL, "job_variables": {}},
    }
    if spec.schedule is not None:
        data["schedules"] = [
            {"cron": spec.schedule.cron, "timezone": spec.schedule.timezone, "active": True}
        ]
    return data


def prefect_yaml_data() -> dict[str, Any]:
    """The whole file as data: the project name, the pinned Prefect version, the deployments."""
    return {
        "name": "fireloop",
        "prefect-version": PREFECT_VERSION,
        "build": None,
        "push": None,
        "deployments": [_deployment(spec) for spec in CATALOG],
    }


def render_prefect_yaml() -> str:
    body: str = yaml.safe_dump(prefect_yaml_data(), sort_keys=False, width=100)
    return HEADER + "\n" + body
