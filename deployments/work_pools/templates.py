"""fireloop's Docker and Kubernetes work-pool templates: each worker's default base job template
with fireloop's overrides, rendered to the JSON files beside this module.

The overrides: the image defaults to the one the repository's Dockerfile builds; every flow run
gets DO_NOT_TRACK=1; on Kubernetes the Job's `backoffLimit` is fixed at 0 (not a variable), so
Kubernetes never starts a crashed run's pod a second time beside Prefect's own retry and the
ledger's resume, and the platform key reaches the pod from a Kubernetes Secret as
FIREWORKS_API_KEY, never as a flow parameter; the runs directory (ledgers, checkpoints) is a
volume, a PersistentVolumeClaim or a named Docker volume, so a resumed run finds its ledger.
Regenerate after upgrading a worker package: `python -m deployments.work_pools.templates
--write` (a test fails while the files differ).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any, Final, Literal

__all__ = [
    "API_KEY_SECRET",
    "FLOW_RUN_ENV",
    "IMAGE",
    "RUNS_DIR",
    "RUNS_VOLUME",
    "TEMPLATE_FILES",
    "WORKDIR",
    "PoolType",
    "render",
    "template",
]

PoolType = Literal["docker", "kubernetes"]

IMAGE: Final = "fireloop:latest"
# Where the image keeps the project (the Dockerfile's WORKDIR) and the runs' ledgers and
# checkpoints: a volume, so a retried or resumed run finds its ledger in a fresh container.
WORKDIR: Final = "/opt/fireloop"
RUNS_DIR: Final = f"{WORKDIR}/runs"
RUNS_VOLUME: Final = "fireloop-runs"
FLOW_RUN_ENV: Final = {"DO_NOT_TRACK": "1"}
# The Kubernetes Secret (key `api-key`) the flow-run pods read FIREWORKS_API_KEY from.
API_KEY_SECRET: Final = "fireloop-fireworks"
TEMPLATE_FILES: Final[dict[PoolType, Path]] = {
    "docker": Path(__file__).with_name("docker.json"),
    "kubernetes": Path(__file__).with_name("kubernetes.json"),
}


def template(pool_type: PoolType) -> dict[str, Any]:
    """The pool's base job template: the worker's default with fireloop's overrides."""
    if pool_type == "docker":
        from prefect_docker.worker import DockerWorker  # type: ignore[import-untyped]

        base: dict[str, Any] = copy.deepcopy(DockerWorker.get_default_base_job_template())
    else:
        from prefect_kubernetes.worker import KubernetesWorker  # type: ignore[import-untyped]

        base = copy.deepcopy(KubernetesWorker.get_default_base_job_template())
    variables = base["variables"]["properties"]
    variables["image"]["default"] = IMAGE
    variables["env"]["default"] = dict(FLOW_RUN_ENV)
    if pool_type == "kubernetes":
        _kubernetes_overrides(base)
    else:
        variables["volumes"]["default"] = [f"{RUNS_VOLUME}:{RUNS_DIR}"]
    return base


def _kubernetes_overrides(base: dict[str, Any]) -> None:
    variables = base["variables"]["properties"]
    del variables["backoff_limit"]  # fixed below: a deployment cannot turn Job retries on
    variables["api_key_secret"] = {
        "title": "API key Secret",
        "description": (
            "Kubernetes Secret whose key `api-key` the flow run reads as FIREWORKS_API_KEY"
        ),
        "type": "string",
        "default": API_KEY_SECRET,
    }
    variables["runs_claim"] = {
        "title": "Runs volume claim",
        "description": f"PersistentVolumeClaim mounted at {RUNS_DIR} (ledgers, checkpoints)",
        "type": "string",
        "default": RUNS_VOLUME,
    }
    manifest = base["job_configuration"]["job_manifest"]
    manifest["spec"]["backoffLimit"] = 0
    pod = manifest["spec"]["template"]["spec"]
    pod["volumes"] = [{"name": "runs", "persistentVolumeClaim": {"claimName": "{{ runs_claim }}"}}]
    container = pod["containers"][0]
    container["volumeMounts"] = [{"name": "runs", "mountPath": RUNS_DIR}]
    # A list here (instead of the `{{ env }}` placeholder) keeps the Secret reference; the
    # worker puts the pool's and Prefect's variables in front of it.
    container["env"] = [
        {
            "name": "FIREWORKS_API_KEY",
            "valueFrom": {"secretKeyRef": {"name": "{{ api_key_secret }}", "key": "api-key"}},
        }
    ]


def render(pool_type: PoolType) -> str:
    """The template as the committed file holds it."""
    return json.dumps(template(pool_type), indent=2, sort_keys=True) + "\n"


def _renderings() -> dict[Path, str]:
    from deployments.work_pools.deploy_files import DEPLOY_FILES, render_deploy_file

    files = {path: render(pool_type) for pool_type, path in TEMPLATE_FILES.items()}
    return files | {path: render_deploy_file(t) for t, path in DEPLOY_FILES.items()}


def main(argv: list[str] | None = None) -> int:
    """Check (or with `--write`, rewrite) the templates and the container pools' deploy files."""
    parser = argparse.ArgumentParser(description="fireloop's container work-pool files")
    parser.add_argument("--write", action="store_true", help="rewrite the files")
    args = parser.parse_args(argv)
    files = _renderings()
    if args.write:
        for path, text in files.items():
            path.write_text(text)
        return 0
    stale = [path for path, text in files.items() if not path.exists() or path.read_text() != text]
    for path in stale:
        sys.stderr.write(f"{path} differs from its rendering: run with --write\n")
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
