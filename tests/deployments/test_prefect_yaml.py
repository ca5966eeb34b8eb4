"""prefect.yaml checked offline, as `prefect deploy` does not (it skips an invalid deployment
with a warning): the committed file is the catalog's rendering, every key is one Prefect knows,
every entrypoint loads, every config validates as the flow will see it, every cron parses."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.cli.deploy._models import DeploymentConfig, PrefectYamlModel
from prefect.client.schemas.schedules import CronSchedule
from prefect.flows import load_flow_from_entrypoint

from deployments.catalog import CATALOG, WORK_POOL
from deployments.prefect_yaml import PREFECT_YAML, render_prefect_yaml

REPO = Path(__file__).resolve().parents[2]


def _raw() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(PREFECT_YAML.read_text(encoding="utf-8"))
    return data


def test_the_committed_file_is_the_catalogs_rendering() -> None:
    assert PREFECT_YAML == REPO / "prefect.yaml"
    assert PREFECT_YAML.read_text(encoding="utf-8") == render_prefect_yaml(), (
        "prefect.yaml is stale: run `fireloop deployments yaml --write`"
    )


def test_every_deployment_validates_as_prefect_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # entrypoints are relative to the repository root
    raw = _raw()
    model = PrefectYamlModel.model_validate(raw)
    assert raw["prefect-version"] == "3.9.1"
    assert [d.name for d in model.deployments] == [spec.name for spec in CATALOG]
    for raw_d, d in zip(raw["deployments"], model.deployments, strict=True):
        # The models ignore unknown keys: a misspelled one would silently vanish.
        assert set(raw_d) <= set(DeploymentConfig.model_fields), raw_d
        assert d.entrypoint is not None
        flow = load_flow_from_entrypoint(d.entrypoint)
        validated = flow.validate_parameters(d.parameters)
        config = validated["config"]
        template = d.parameters["config"].get("run_name_template")
        if template is not None:  # named now, outside a flow run: the template's shape
            prefix = template.split("{", 1)[0]
            assert re.fullmatch(re.escape(prefix) + r"\d{8}(-\d{4})?", config.run_name)
        for schedule in d.schedules or []:
            CronSchedule(cron=schedule.cron, timezone=schedule.timezone)
        assert d.work_pool is not None and d.work_pool.name == WORK_POOL
        assert d.concurrency_limit is not None
        assert raw_d["concurrency_limit"]["limit"] == 1


def test_a_broken_file_is_caught_by_these_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks above can fail: a misspelled key, a bad cron, a wrongly typed config."""
    monkeypatch.chdir(REPO)
    raw = _raw()
    first = raw["deployments"][0]
    assert not set({**first, "paramters": {}}) <= set(DeploymentConfig.model_fields)
    with pytest.raises(ValueError, match="Invalid cron"):
        CronSchedule(cron="0 3 * *", timezone="UTC")
    flow = load_flow_from_entrypoint(first["entrypoint"])
    with pytest.raises(Exception, match="max_steps"):
        flow.validate_parameters({"config": {**first["parameters"]["config"], "max_steps": "x"}})
