"""`fireloop run dpo` and `fireloop run orpo` from a user's terminal, as `run sft` is used.

Each recipe trains a handful of steps of the tiny model on `reverse_pairs` and ends with a
summary naming its headline metric; a user's own JSONL file, its pairs in the three accepted
forms mixed, trains too; a bad line stops the run before any trainer exists, naming the file,
line and field; a bad hyperparameter is refused by name; the resume command names the recipe.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from fireloop.recipes import RECIPES
from fireloop.run_cli import EXIT_USER_ERROR, RunRequest, print_interrupted
from flows.config import ORPOConfig
from tests.cli.support import cli_env, ledger_rows, prefect_server, preference_args, run_cli


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with prefect_server(tmp_path_factory.mktemp("prefect-server")) as api_url:
        yield api_url


def _conversation(word: str, reply: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{word}="}, {"role": "assistant", "content": reply}]


def _pair_in_form(form: int, word: str) -> dict[str, Any]:
    """`word=` answered by its reversal (chosen) or by a rotation of it (rejected), in the
    accepted form `form` (0: chosen/rejected, 1: scored samples, 2: OpenAI's)."""
    chosen = word[::-1]
    rejected = chosen[1:] + chosen[0]  # differs: the words have distinct letters
    if form == 0:
        return {
            "chosen": {"messages": _conversation(word, chosen)},
            "rejected": {"messages": _conversation(word, rejected)},
        }
    if form == 1:
        return {
            "samples": [
                {"messages": _conversation(word, rejected), "evals": {"score": 0.0}},
                {"messages": _conversation(word, chosen), "score": 1.0},
            ]
        }
    return {
        "input": f"{word}=",
        "preferred_output": chosen,
        "non_preferred_output": [{"role": "assistant", "content": rejected}],
    }


def write_pairs(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


WORDS = ["ab", "bca", "cdh", "dae", "efgh", "fgb", "gha", "hbd", "acf", "bdge", "ceh", "dfa"]


def user_pairs(path: Path) -> Path:
    """Twelve pairs, the three forms in turn."""
    return write_pairs(path, [_pair_in_form(i % 3, word) for i, word in enumerate(WORDS)])


def metrics_rows(run_dir: Path) -> list[dict[str, Any]]:
    text = (run_dir / "metrics.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line]


@pytest.mark.parametrize("recipe", ["orpo", "dpo"])
def test_a_recipe_trains_reverse_pairs_and_ends_with_its_headline_metric(
    tmp_path: Path, server: str, recipe: str
) -> None:
    run_dir = tmp_path / "run"
    # 32 pairs, not the task's 1024: DPO computes the reference of every pair before training.
    done = run_cli(
        preference_args(recipe, run_dir, f"{recipe}-toy", max_rows=32),
        cli_env(tmp_path / "home", server),
        tmp_path,
    )

    assert done.returncode == 0, done.stdout
    out = done.stdout
    headline = RECIPES[recipe].config_class().headline_metric  # train/<recipe>_loss
    name = headline.removeprefix("train/")
    steps = metrics_rows(run_dir)
    assert [row["step"] for row in steps] == [0, 1, 2, 3]
    assert f"{recipe} {recipe}-toy" in out and "4/4" in out  # the progress bar, labelled
    final = next(line for line in out.splitlines() if line.strip().startswith("final"))
    assert f"{name} {steps[-1][headline]:.4g}" in final, out
    assert "eval/accuracy" in final and "(after 4 steps)" in final
    assert str(run_dir / "ledger.jsonl") in out
    assert f"fireloop export {run_dir} --out" in out
    assert ledger_rows(run_dir)[-1]["kind"] == "run_end"


def test_a_users_jsonl_of_mixed_forms_trains(tmp_path: Path, server: str) -> None:
    pairs = user_pairs(tmp_path / "my pairs.jsonl")
    run_dir = tmp_path / "run"
    args = preference_args("orpo", run_dir, "mine", dataset=pairs, max_steps=2, eval_size=2)

    done = run_cli(args, cli_env(tmp_path / "home", server), tmp_path)

    assert done.returncode == 0, done.stdout
    # A tenth of the file is carved out for evaluation; the rest trains.
    assert f"dataset {pairs}: 11 training pairs, 1 eval pairs" in done.stdout
    assert [row["step"] for row in metrics_rows(run_dir)] == [0, 1]
    assert "orpo_loss" in next(line for line in done.stdout.splitlines() if "final" in line)


@pytest.mark.parametrize("recipe", ["orpo", "dpo"])
def test_a_bad_line_stops_the_run_naming_file_line_and_field(
    tmp_path: Path, server: str, recipe: str
) -> None:
    graded = {
        "samples": [
            {"messages": _conversation("abc", "cba"), "score": 1.0},
            {"messages": _conversation("abc", "bac"), "score": 0.5},
        ]
    }
    good = _pair_in_form(0, "abc")
    pairs = write_pairs(tmp_path / "pairs.jsonl", [good, graded, good])
    run_dir = tmp_path / "run"

    done = run_cli(
        preference_args(recipe, run_dir, "bad", dataset=pairs),
        cli_env(tmp_path / "home", server),
        tmp_path,
    )

    assert done.returncode == EXIT_USER_ERROR, done.stdout
    assert f"{pairs}:2: samples[1].score: graded score 0.5" in done.stdout
    assert "Traceback" not in done.stdout
    assert not (run_dir / "platform" / "jobs").exists()  # no trainer was created


def test_a_bad_hyperparameter_is_refused_by_name(tmp_path: Path, server: str) -> None:
    """One recipe is enough: every recipe's config is validated by the same code."""
    args = ["run", "dpo", "--set", "beta=0", "--set", f"run_dir={tmp_path / 'run'}"]

    done = run_cli(args, cli_env(tmp_path / "home", server), tmp_path)

    assert done.returncode == EXIT_USER_ERROR, done.stdout
    assert "invalid DPO config" in done.stdout
    assert "beta\n  Input should be greater than 0" in done.stdout
    assert "Traceback" not in done.stdout
    assert not (tmp_path / "run").exists()


def test_the_resume_command_names_the_recipe() -> None:
    request = RunRequest(
        {"dataset": "my pairs.jsonl"}, assignments=("dataset=my pairs.jsonl",), recipe="dpo"
    )

    assert request.rerun_command("dpo-20261205-093000-ab12") == (
        "fireloop run dpo --set 'dataset=my pairs.jsonl' --set run_name=dpo-20261205-093000-ab12"
    )


def test_an_interrupted_run_says_how_to_resume_it_with_its_recipe(tmp_path: Path) -> None:
    config = ORPOConfig(run_name="stopped", run_dir=str(tmp_path / "run"))
    request = RunRequest(
        {"run_dir": config.run_dir}, assignments=(f"run_dir={config.run_dir}",), recipe="orpo"
    )
    console = Console(record=True, width=300, color_system=None)

    print_interrupted(console, request, config, 143)

    text = console.export_text()
    assert "stopped by SIGTERM: run stopped was not finished; no checkpoint was saved yet" in text
    assert f"fireloop run orpo --set run_dir={config.run_dir} --set run_name=stopped" in text
