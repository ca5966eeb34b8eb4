"""The small parts of a run, without Prefect: config, redaction, metrics log, data, ids."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from algorithms.datasets import DatasetError, write_jsonl
from algorithms.toy_tasks import reverse_rows
from flows.config import PlatformConfig, SFTConfig, training_identity_hash
from flows.lifecycle import derive_id
from flows.monitoring import MetricsLog, artifact_key
from flows.redaction import REDACTED, redact_secrets
from flows.sft_data import load_sft_data
from sdk._ids import DNS_LABEL
from tasks.training import StepRecord

KEY = "fw-local-0123456789abcdef"


def test_the_api_key_is_masked_in_every_rendering_of_the_config() -> None:
    config = SFTConfig(platform=PlatformConfig(base_url="http://x", api_key=SecretStr(KEY)))
    for text in (repr(config), str(config), config.model_dump_json(), str(config.model_dump())):
        assert KEY not in text
    assert config.platform is not None and config.platform.api_key is not None
    assert config.platform.api_key.get_secret_value() == KEY


def test_the_identity_hash_ignores_how_a_run_is_operated() -> None:
    base = SFTConfig()
    operated = base.model_copy(
        update={"run_dir": "/elsewhere", "eval_every": 3, "teardown": "delete", "flow_retries": 5}
    )
    assert training_identity_hash(base) == training_identity_hash(operated)
    for change in ({"seed": 1}, {"learning_rate": 1e-3}, {"batch_size": 8}, {"max_steps": 7}):
        assert training_identity_hash(base) != training_identity_hash(
            base.model_copy(update=change)
        )


@pytest.mark.parametrize(
    "fields",
    [{"run_name": "Has Spaces"}, {"max_steps": 0}, {"lora_rank": -1}, {"bogus": 1}],
)
def test_invalid_configs_name_the_field(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError) as raised:
        SFTConfig(**fields)
    assert next(iter(fields)) in str(raised.value)


def test_derived_ids_are_dns_labels_and_differ_per_run_dir() -> None:
    first = derive_id("a" * 40, "/runs/one", "trainer")
    assert DNS_LABEL.fullmatch(first)
    assert first != derive_id("a" * 40, "/runs/two", "trainer")


def test_redaction_masks_messages_arguments_and_tracebacks() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("tests.redaction")
    logging.getLogger().addHandler(handler)
    try:
        with redact_secrets([KEY]):
            logger.warning("key %s in args", KEY)
            logger.warning(f"key {KEY} in the message")
            try:
                raise RuntimeError(f"failed with {KEY}")
            except RuntimeError:
                logger.exception("a traceback")
        logger.warning("after the block: %s", KEY)  # no longer registered
    finally:
        logging.getLogger().removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert KEY not in "\n".join(lines[:-1]) and lines[0] == f"key {REDACTED} in args"
    assert "RuntimeError: failed with ***" in stream.getvalue()
    assert KEY in lines[-1]


def _record(step: int) -> StepRecord:
    return StepRecord(
        step=step, epoch=0, data_cursor=4 * (step + 1), row_indices=[step], metrics={"m": 1.0}
    )


def test_the_metrics_log_rewinds_to_the_resumed_step(tmp_path: Path) -> None:
    log = MetricsLog(str(tmp_path))
    log.append([_record(step) for step in range(6)])
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 6, "torn')  # a crash mid-append
    log.rewind(4)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2, 3]
    log.append([_record(4)])
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 5


def test_artifact_keys_are_sanitized() -> None:
    assert artifact_key("sft", "My_Run.v2", "progress") == "sft-my-run-v2-progress"


def test_a_toy_task_gets_its_eval_split(tmp_path: Path) -> None:
    data = load_sft_data(SFTConfig(max_rows=32, eval_size=8))
    assert (len(data.train), data.eval is not None and len(data.eval)) == (32, 8)


def test_a_file_gets_a_seeded_carve_out(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    write_jsonl(reverse_rows(50, seed=0, split="train"), path)
    first = load_sft_data(SFTConfig(dataset=str(path), eval_size=100))
    again = load_sft_data(SFTConfig(dataset=str(path), eval_size=100))
    assert first.eval is not None and len(first.eval) == 5  # at most 10 %
    assert len(first.train) == 45 and first.eval.rows == (again.eval.rows if again.eval else ())
    assert set(first.eval.line_numbers).isdisjoint(first.train.line_numbers)


def test_a_missing_eval_dataset_is_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such file"):
        load_sft_data(SFTConfig(eval_dataset=str(tmp_path / "missing.jsonl")))


def test_the_flow_renders_its_config_as_a_form_with_a_masked_key() -> None:
    from flows.sft import sft_flow

    schema = sft_flow.parameters.model_dump()
    assert list(schema["properties"]) == ["config"]
    definitions = schema.get("definitions") or schema["$defs"]
    key_field = definitions["PlatformConfig"]["properties"]["api_key"]["anyOf"][0]
    assert key_field == {"format": "password", "type": "string", "writeOnly": True}
    raw = {"run_name": "ui", "platform": {"base_url": "http://h", "api_key": KEY}}
    config = sft_flow.validate_parameters({"config": raw})["config"]
    assert isinstance(config, SFTConfig) and KEY not in repr(config)
