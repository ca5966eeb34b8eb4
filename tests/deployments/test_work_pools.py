"""The Docker and Kubernetes work-pool templates, validated offline as the server and the
workers would read them (no Docker daemon or cluster here).

Each committed JSON file is the rendering of `deployments.work_pools.templates`; the server's
work-pool model accepts it; the worker's job configuration is built from it and a deployment's
job variables exactly as the worker builds it for a flow run (`from_template_and_values`, then
`prepare_for_flow_run`), and the resulting Kubernetes Job or Docker container is checked.
"""

from __future__ import annotations

import asyncio
import json
import tomllib
import uuid
from typing import Any

import pytest
import yaml
from prefect.cli.deploy._models import PrefectYamlModel
from prefect.client.schemas.objects import FlowRun
from prefect.server.schemas.actions import WorkPoolCreate
from prefect_docker.worker import DockerWorkerJobConfiguration
from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

from deployments.work_pools.deploy_files import DEPLOY_FILES, POOL_NAMES, render_deploy_file
from deployments.work_pools.templates import (
    API_KEY_SECRET,
    IMAGE,
    RUNS_DIR,
    RUNS_VOLUME,
    TEMPLATE_FILES,
    WORKDIR,
    PoolType,
    main,
    render,
)


def _committed(pool_type: PoolType) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(TEMPLATE_FILES[pool_type].read_text())
    return data


class _NoServer:
    """Stands in for the Prefect client a worker passes: the templates reference no blocks and
    no variables, so nothing may be read from a server (and none is started)."""

    async def read_block_document(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the template references a block")

    async def read_variable_by_name(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the template references a variable")


def _flow_run() -> FlowRun:
    return FlowRun(id=uuid.uuid4(), name="rl-weekly-20261207", flow_id=uuid.uuid4())


@pytest.mark.parametrize("pool_type", ["docker", "kubernetes"])
def test_the_committed_templates_are_the_rendering(pool_type: PoolType) -> None:
    assert TEMPLATE_FILES[pool_type].read_text() == render(pool_type)
    assert main([]) == 0


@pytest.mark.parametrize("pool_type", ["docker", "kubernetes"])
def test_the_server_accepts_the_template(pool_type: PoolType) -> None:
    pool = WorkPoolCreate(
        name=f"fireloop-{pool_type}", type=pool_type, base_job_template=_committed(pool_type)
    )
    assert pool.base_job_template["variables"]["properties"]["image"]["default"] == IMAGE
    broken = _committed(pool_type)
    broken["job_configuration"]["image"] = "{{ no_such_variable }}"
    with pytest.raises(ValueError, match="no_such_variable"):
        WorkPoolCreate(name="broken", type=pool_type, base_job_template=broken)


def _kubernetes_job(job_variables: dict[str, Any]) -> KubernetesWorkerJobConfiguration:
    configuration = asyncio.run(
        KubernetesWorkerJobConfiguration.from_template_and_values(
            _committed("kubernetes"),
            job_variables,
            client=_NoServer(),  # type: ignore[arg-type]
        )
    )
    configuration.prepare_for_flow_run(_flow_run())
    return configuration


def test_the_kubernetes_job_never_runs_a_crashed_flow_twice_and_reads_the_key_from_a_secret() -> (
    None
):
    # `backoff_limit` is no variable of this pool: a deployment asking for Job retries gets none.
    job = _kubernetes_job({"image": "registry.example/fireloop:1.0", "backoff_limit": 3})
    manifest = job.job_manifest
    assert manifest["spec"]["backoffLimit"] == 0
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example/fireloop:1.0"
    env = {e["name"]: e for e in container["env"]}
    assert env["DO_NOT_TRACK"]["value"] == "1"
    assert env["FIREWORKS_API_KEY"] == {
        "name": "FIREWORKS_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": API_KEY_SECRET, "key": "api-key"}},
    }
    assert "value" not in env["FIREWORKS_API_KEY"]  # the key itself is nowhere in the pool
    # With no Job retries, a pod evicted mid-run hands the run back to Prefect to reschedule.
    assert env["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"]["value"] == "reschedule"
    assert "PREFECT__FLOW_RUN_ID" in env
    pod = manifest["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    claim = {"name": "runs", "persistentVolumeClaim": {"claimName": RUNS_VOLUME}}
    assert pod["volumes"] == [claim]
    assert container["volumeMounts"] == [{"name": "runs", "mountPath": RUNS_DIR}]


def test_a_deployment_can_name_another_secret_and_add_env() -> None:
    job = _kubernetes_job({"api_key_secret": "team-key", "env": {"FIRELOOP_X": "1"}})
    env = {
        e["name"]: e for e in job.job_manifest["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["FIREWORKS_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "team-key"
    assert env["FIRELOOP_X"]["value"] == "1"
    assert env["DO_NOT_TRACK"]["value"] == "1"  # the pool's own env is merged, not replaced
    assert job.job_manifest["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE


def test_the_docker_container_gets_the_image_and_env() -> None:
    configuration = asyncio.run(
        DockerWorkerJobConfiguration.from_template_and_values(
            _committed("docker"),
            {"env": {"FIRELOOP_X": "1"}},
            client=_NoServer(),  # type: ignore[arg-type]
        )
    )
    configuration.prepare_for_flow_run(_flow_run())
    assert configuration.image == IMAGE
    assert configuration.env["DO_NOT_TRACK"] == "1" and configuration.env["FIRELOOP_X"] == "1"
    assert "PREFECT__FLOW_RUN_ID" in configuration.env
    assert configuration.volumes == [f"{RUNS_VOLUME}:{RUNS_DIR}"]
    assert "FIREWORKS_API_KEY" not in json.dumps(_committed("docker"))


ROOT = TEMPLATE_FILES["docker"].parents[2]


def _dockerfile() -> list[str]:
    return (ROOT / "Dockerfile").read_text().splitlines()


def test_the_image_holds_what_the_flows_import() -> None:
    """No daemon here to build it: check what can be read. Every package pyproject.toml
    installs is copied (and not ignored), the scale-out pins are pyproject's, and the paths
    are the templates' (the working directory and the runs volume)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    lines = _dockerfile()
    assert lines[[line.startswith("FROM") for line in lines].index(True)] == "FROM python:3.11-slim"
    copied = {word for line in lines if line.startswith("COPY ") for word in line.split()[1:-1]}
    assert packages <= copied, packages - copied
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert not (packages | {"pyproject.toml", "README.md", "prefect.yaml"}) & ignored
    assert f"WORKDIR {WORKDIR}" in lines and f'VOLUME ["{RUNS_DIR}"]' in lines
    dev_pins = {
        pin
        for pin in pyproject["project"]["optional-dependencies"]["dev"]
        if "dask" in pin or "distributed" in pin
    }
    installs = " ".join(line for line in lines if line.startswith("RUN pip install"))
    assert dev_pins and all(pin in installs for pin in dev_pins), dev_pins


@pytest.mark.parametrize("pool_type", ["docker", "kubernetes"])
def test_the_container_deploy_files_put_every_deployment_on_the_pool(pool_type: PoolType) -> None:
    """What `prefect deploy --all --prefect-file ...` reads: prefect.yaml's deployments, each on
    the container pool, entering the image's working directory before loading the flow."""
    raw = yaml.safe_load(DEPLOY_FILES[pool_type].read_text())
    model = PrefectYamlModel.model_validate(raw)
    process = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert [d.name for d in model.deployments] == [d["name"] for d in process["deployments"]]
    for ours, theirs in zip(raw["deployments"], process["deployments"], strict=True):
        assert ours["work_pool"] == {"name": POOL_NAMES[pool_type], "job_variables": {}}
        assert {**ours, "work_pool": None} == {**theirs, "work_pool": None}
    step = {"prefect.deployments.steps.set_working_directory": {"directory": WORKDIR}}
    assert raw["pull"] == [step]
    assert f"--base-job-template deployments/work_pools/{pool_type}.json" in render_deploy_file(
        pool_type
    )
