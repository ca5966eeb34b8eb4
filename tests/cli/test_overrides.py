"""Config files and `--set` overrides of the `fireloop run` command."""

from __future__ import annotations

from pathlib import Path

import pytest

from fireloop.overrides import ConfigFileError, apply_overrides, load_config_file


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("c.json", '{"max_steps": 5, "adam": {"eps": 1e-8}}'),
        ("c.yaml", "max_steps: 5\nadam:\n  eps: 1.0e-8\n"),
        ("c.toml", "max_steps = 5\n[adam]\neps = 1e-8\n"),
    ],
)
def test_every_format_reads_the_same_mapping(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    assert load_config_file(path) == {"max_steps": 5, "adam": {"eps": 1e-8}}


def test_overrides_parse_json_values_and_nest() -> None:
    config = {"max_steps": 5, "adam": {"eps": 1e-8}}
    result = apply_overrides(
        config,
        ["max_steps=40", "adam.grad_clip_norm=0.5", "dataset=reverse", "wandb.mode=offline"],
    )
    assert result == {
        "max_steps": 40,
        "adam": {"eps": 1e-8, "grad_clip_norm": 0.5},
        "dataset": "reverse",
        "wandb": {"mode": "offline"},
    }
    assert config == {"max_steps": 5, "adam": {"eps": 1e-8}}  # the input is left alone


@pytest.mark.parametrize(
    ("files", "assignments", "message"),
    [
        ({"c.ini": "x"}, [], "use .json"),
        ({"c.json": "{oops"}, [], "not valid json"),
        ({"c.yaml": "- 1\n- 2\n"}, [], "must hold a mapping"),
        ({}, ["max_steps"], "expected key=value"),
        ({}, ["a..b=1"], "expected key=value"),
        ({}, ["max_steps=3", "max_steps.x=1"], "'max_steps' is not a mapping"),
    ],
    ids=["suffix", "bad-json", "not-a-mapping", "no-equals", "empty-key", "scalar-parent"],
)
def test_bad_config_input_names_the_problem(
    tmp_path: Path, files: dict[str, str], assignments: list[str], message: str
) -> None:
    with pytest.raises(ConfigFileError, match=message):
        config = {}
        for name, text in files.items():
            (tmp_path / name).write_text(text, encoding="utf-8")
            config = load_config_file(tmp_path / name)
        apply_overrides(config, assignments)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="does not exist"):
        load_config_file(tmp_path / "absent.yaml")
