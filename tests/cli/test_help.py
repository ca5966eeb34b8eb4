"""What a new user can discover from the CLI alone: config fields, local models, toy tasks.

The help text, the `models`/`tasks` tables and the README's config reference are generated from
the code (the config model, the model registry, the toy-task table); these tests hold them to it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from algorithms.toy_tasks import TOY_TASKS
from backend.models.registry import REGISTERED_MODELS
from fireloop.cli import app
from fireloop.cli import console as cli_console
from fireloop.help import REFERENCE_END, REFERENCE_START, config_fields, config_reference_markdown
from fireloop.recipes import RECIPES
from flows.config import DPOConfig, ORPOConfig, RLConfig, SFTConfig

README = Path(__file__).resolve().parents[2] / "README.md"
WIDE = {"COLUMNS": "250", "NO_COLOR": "1", "TERM": "dumb"}


def _invoke(*args: str) -> str:
    # The CLI's console fixes its width when first built, from COLUMNS at that moment (another
    # test in the same process may have built it narrower): widen it for this call.
    width = cli_console.width
    cli_console.width = int(WIDE["COLUMNS"])
    try:
        result = CliRunner().invoke(app, list(args), env=WIDE)
    finally:
        cli_console.width = width
    assert result.exit_code == 0, result.output
    return result.output


def test_every_sft_field_has_a_one_line_description() -> None:
    rows = config_fields(SFTConfig)
    missing = [row.key for row in rows if not row.help.strip()]
    assert missing == []
    assert {"adam.beta1", "platform.api_key", "waits.poll_interval_s"} <= {r.key for r in rows}


def test_run_sft_help_lists_the_config_fields_with_types_and_defaults() -> None:
    text = _invoke("run", "sft", "--help")
    for row in config_fields(SFTConfig):
        assert re.search(rf"^\s*{re.escape(row.key)}\s", text, re.MULTILINE), row.key
    assert re.search(r"adam\.beta1\s+float \[default: 0\.9\]\s+First-moment decay", text)
    assert re.search(r"max_steps\s+int \[default: 100\]\s+Optimizer steps in the run", text)
    assert re.search(r"lr_schedule\s+constant\|linear\|cosine \[default: constant\]", text)
    assert re.search(r"platform\.api_key\s+secret\?", text)


@pytest.mark.parametrize(
    ("recipe", "own_field"),
    [
        ("dpo", r"beta\s+float \[default: 0\.1\]\s+DPO temperature"),
        ("orpo", r"orpo_lambda\s+float \[default: 1\.0\]\s+Weight of the odds-ratio term"),
    ],
)
def test_run_dpo_and_orpo_help_list_their_own_config_fields(recipe: str, own_field: str) -> None:
    text = _invoke("run", recipe, "--help")
    for row in config_fields(RECIPES[recipe].config_class()):
        assert re.search(rf"^\s*{re.escape(row.key)}\s", text, re.MULTILINE), row.key
    assert re.search(own_field, text)
    assert re.search(r"dataset\s+str \[default: reverse_pairs\]", text)
    assert "--config" in text and "--set" in text and "--verbose" in text


def test_the_registry_names_each_recipes_own_config() -> None:
    classes = {name: recipe.config_class() for name, recipe in RECIPES.items()}
    assert classes == {"sft": SFTConfig, "dpo": DPOConfig, "orpo": ORPOConfig, "rl": RLConfig}
    assert all(cls.recipe == name for name, cls in classes.items())


def test_the_cli_imports_no_training_stack_until_a_recipe_runs() -> None:
    """`fireloop --help` and the registry must not pay the seconds a flow import costs."""
    probe = (
        "import sys, fireloop.cli; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'flows', 'algorithms', 'torch', 'transformers', 'prefect', 'tinker'}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"


def test_models_lists_the_local_base_models() -> None:
    text = _invoke("models")
    for spec in REGISTERED_MODELS.values():
        line = next(line for line in text.splitlines() if spec.hf_name in line)
        assert spec.parameters in line and str(spec.context_length) in line


def test_tasks_lists_the_toy_tasks_with_an_example() -> None:
    text = _invoke("tasks")
    assert set(TOY_TASKS) == {"reverse", "addition"}
    assert re.search(
        r"│ reverse\s+│ reverse a word.*user: '[a-h]+='\s+assistant: '[a-h]+'.*│ sft\s+│", text
    )
    assert re.search(
        r"│ addition\s+│ add two digits.*user: '\d\+\d='\s+assistant: '\d'.*│ sft, rl\s+│", text
    )
    assert re.search(
        r"│ reverse_pairs\s+│ prefer the right reversal.*user: '[a-h]+='\s+chosen: '[a-h]+'"
        r"\s+rejected: '[a-h]+'.*│ eval/accuracy\s+│ dpo, orpo\s+│",
        text,
    )


@pytest.mark.parametrize("recipe", ["sft", "dpo", "orpo", "rl"])
def test_the_readme_config_reference_is_the_generated_one(recipe: str) -> None:
    generated = _invoke("config-reference", recipe)
    assert generated == config_reference_markdown(RECIPES[recipe].config_class())
    readme = README.read_text(encoding="utf-8")
    start = REFERENCE_START.format(recipe=recipe)
    end = REFERENCE_END.format(recipe=recipe)
    assert start in readme and end in readme, "README.md lacks the config-reference markers"
    block = readme.split(start, 1)[1].split(end, 1)[0]
    assert block == "\n" + generated, (
        f"README.md's config reference is stale: replace the block with "
        f"`fireloop config-reference {recipe}`"
    )


def test_an_unknown_recipe_is_refused() -> None:
    result = CliRunner().invoke(app, ["config-reference", "nope"], env=WIDE)
    assert result.exit_code == 2
    assert "unknown recipe 'nope'; known: sft, dpo, orpo, rl" in result.output
