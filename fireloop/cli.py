"""`fireloop`: run recipes (SFT, DPO, ORPO, RL), the demos, the local platform; export results."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fireloop.recipes import RECIPES, Recipe, recipe_names
from fireloop.serve_cli import deployments_app, serve

app = typer.Typer(
    help="Workflow-orchestrated LLM training pipelines.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


@app.command()
def backend(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Interface to bind (loopback by default).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8700,
    data_dir: Annotated[
        Path, typer.Option(help="Where jobs, checkpoints and snapshots are kept.")
    ] = Path(".fireloop/platform"),
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="FIREWORKS_API_KEY",
            help="Key clients must present (prefer the env var or --api-key-file: a command "
            "line is visible to other local users).",
            show_default=False,
        ),
    ] = None,
    api_key_file: Annotated[
        Path | None,
        typer.Option(help="Read the key from this file (first line).", show_default=False),
    ] = None,
    models_dir: Annotated[
        Path | None,
        typer.Option(
            help="Shared cache of built base models [default: $FIRELOOP_MODEL_CACHE, else "
            "~/.cache/fireloop/models].",
            show_default=False,
        ),
    ] = None,
    account_id: Annotated[str, typer.Option(help="The one account served.")] = "local",
    preempt_at_step: Annotated[
        list[int] | None,
        typer.Option(
            help="Fault drill, for recovery tests and rehearsals: preempt the trainer job that "
            "reaches this optimizer step count (repeatable; each count fires once, so the "
            "resumed run trains past it).",
            show_default=False,
            min=1,
        ),
    ] = None,
) -> None:
    """Serve the local platform (control plane, trainer gateway, hotload, inference) in the
    foreground. Without a key option, the key kept in <data-dir>/api-key is used (created once)."""
    import logging

    # typer ships its own click: compare with its enum, not the separately installed one.
    from typer._click.core import ParameterSource

    from backend import serve

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    on_command_line = ctx.get_parameter_source("api_key") == ParameterSource.COMMANDLINE
    key_source = "from --api-key" if on_command_line else "from FIREWORKS_API_KEY"
    if api_key_file is not None:
        # The file, named on purpose, wins over FIREWORKS_API_KEY; two explicit keys are an error.
        if on_command_line:
            console.print("give the key one way: --api-key-file or --api-key", markup=False)
            raise typer.Exit(2)
        try:
            lines = api_key_file.read_text(encoding="utf-8").strip().splitlines()
        except OSError as exc:
            console.print(
                f"--api-key-file: cannot read {api_key_file}: {exc.strerror}", markup=False
            )
            raise typer.Exit(2) from None
        if not lines or not lines[0].strip():
            console.print(f"--api-key-file: {api_key_file} is empty", markup=False)
            raise typer.Exit(2)
        api_key, key_source = lines[0].strip(), f"from {api_key_file}"
    elif on_command_line:
        logging.getLogger("fireloop.backend").warning(
            "--api-key on the command line is visible to other local users in the process "
            "list; prefer FIREWORKS_API_KEY or --api-key-file"
        )
    try:
        serve(
            host=host,
            port=port,
            data_dir=data_dir,
            api_key=api_key,
            account_id=account_id,
            models_dir=models_dir,
            api_key_source=key_source,
            preempt_at_steps=preempt_at_step or (),
        )
    except ValueError as exc:  # a non-loopback host
        console.print(str(exc), markup=False)
        raise typer.Exit(2) from None


run_app = typer.Typer(help="Run a recipe flow.", no_args_is_help=True)
app.add_typer(run_app, name="run")
app.command()(serve)
app.add_typer(deployments_app, name="deployments")


def _fields_help(recipe: Recipe) -> type[typer.core.TyperCommand]:
    """A command class whose `--help` ends with the recipe's config fields, built only when
    help is shown (the config model imports the training stack, seconds that other commands
    should not pay)."""

    class FieldsHelp(typer.core.TyperCommand):
        @property
        def epilog(self) -> str:
            from fireloop.help import fields_epilog

            return fields_epilog(recipe.config_class())

        @epilog.setter
        def epilog(self, value: str | None) -> None:
            pass  # click sets it in __init__; the property above is the epilog

    return FieldsHelp


def _add_run_command(recipe: Recipe) -> None:
    """`fireloop run <recipe>`: the same options and behaviour for every recipe."""

    def run_recipe(
        config: Annotated[
            Path | None, typer.Option(help="Config file (.json, .yaml, .toml) of the fields below.")
        ] = None,
        set_: Annotated[
            list[str] | None,
            typer.Option("--set", help="Override a field: key=value (dotted keys nest)."),
        ] = None,
        verbose: Annotated[
            bool, typer.Option(help="Also show Prefect's log lines and third-party warnings.")
        ] = False,
    ) -> None:
        from fireloop.overrides import ConfigFileError
        from fireloop.run_cli import RunRequest, build_config, print_error, run_and_report

        try:
            data = build_config(config, set_ or [])
        except ConfigFileError as exc:
            print_error(console, str(exc))
            raise typer.Exit(2) from None
        request = RunRequest(
            data,
            config_file=config,
            assignments=tuple(set_ or ()),
            verbose=verbose,
            recipe=recipe.name,
        )
        raise typer.Exit(run_and_report(request, console))

    run_app.command(recipe.name, cls=_fields_help(recipe), help=recipe.help)(run_recipe)


for _recipe in RECIPES.values():
    _add_run_command(_recipe)


DEMOS = ("sft", "rl")


@app.command()
def demo(
    recipe: Annotated[
        str,
        typer.Argument(
            help="sft: SFT of the tiny model on string reversal. rl: SFT on addition as a "
            "warm start, then RL (GRPO by default) from its last checkpoint."
        ),
    ] = "sft",
    max_steps: Annotated[
        int | None,
        typer.Option(
            help="Optimizer steps; for rl, the RL run's steps (its SFT warm start keeps its "
            "own). Default: 100 for sft, 60 for rl.",
            show_default=False,
        ),
    ] = None,
    policy_loss: Annotated[
        str | None,
        typer.Option(
            help="rl only: grpo (the default), dapo, gspo, cispo, dro, importance_sampling or "
            "reinforce.",
            show_default=False,
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(
            help="rl only: resume the stopped demo of this name (the command is printed when "
            "one is stopped).",
            show_default=False,
        ),
    ] = None,
    smoke: Annotated[
        bool, typer.Option(help="Only provision and tear down a trainer and a deployment.")
    ] = False,
    verbose: Annotated[
        bool, typer.Option(help="Also show Prefect's log lines and third-party warnings.")
    ] = False,
) -> None:
    """The main job: SFT of the tiny model on string reversal, on the embedded platform,
    with verified hotloads and evaluation through the deployment. `fireloop demo rl`: an SFT
    warm start on addition, then RL rewarded for right sums, ending with its reward curve."""
    if recipe not in DEMOS:
        console.print(f"unknown demo {recipe!r}; known: {', '.join(DEMOS)}", markup=False)
        raise typer.Exit(2)
    if recipe == "rl":
        if smoke:
            console.print("--smoke provisions only: run it without rl", markup=False)
            raise typer.Exit(2)
        from fireloop.rl_demo_cli import RLDemoRequest, run_rl_demo

        request = RLDemoRequest(max_steps, policy_loss, name, verbose)
        raise typer.Exit(run_rl_demo(request, console))
    if policy_loss is not None or name is not None:
        console.print("--policy-loss and --name are options of `demo rl`", markup=False)
        raise typer.Exit(2)
    if smoke:
        _smoke()
        return
    _sft_demo(100 if max_steps is None else max_steps, verbose)


def _sft_demo(max_steps: int, verbose: bool) -> None:
    from datetime import UTC, datetime

    from fireloop.run_cli import RunRequest, run_and_report

    run_name = "demo-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    console.print(
        f"[bold]fireloop demo[/]: SFT of fireloop/tiny on string reversal ({max_steps} steps), "
        "embedded local platform, evaluation through a hotloaded deployment"
    )
    data = {"run_name": run_name, "max_steps": max_steps, "dataset": "reverse"}
    # Resuming a demo is `run sft` with the same fields: say them all.
    assignments = tuple(f"{key}={value}" for key, value in data.items())
    request = RunRequest(data, assignments=assignments, verbose=verbose)
    raise typer.Exit(run_and_report(request, console))


def _smoke() -> None:
    from fireloop.smoke import SmokeStep, run_smoke

    def show(step: SmokeStep) -> None:
        console.print(f"[green]✓[/] {step.name} [dim]({step.seconds:.2f} s)[/] {step.detail}")

    report = run_smoke(on_step=show)
    console.print(
        f"job {report.job_id}: {report.final_job_state}; "
        f"deployment {report.deployment_id}: {report.deployment_after_delete}"
    )


@app.command()
def models() -> None:
    """The base models of the local platform: name, parameters, context, what each is for."""
    from rich.table import Table

    from fireloop.help import model_rows

    table = Table("base_model", "parameters", "context", "for", title="local base models")
    for row in model_rows():
        table.add_row(*row)
    console.print(table)


@app.command()
def tokenizers(
    base_models: Annotated[
        list[str], typer.Argument(help="Local base models, e.g. fireloop/tiny.", show_default=False)
    ],
    hf_home: Annotated[
        Path | None,
        typer.Option(
            envvar="HF_HOME",
            help="Hugging Face home whose hub cache receives the tokenizers "
            "[default: $HF_HOME, else ~/.cache/huggingface].",
            show_default=False,
        ),
    ] = None,
    models_dir: Annotated[
        Path | None,
        typer.Option(
            help="Shared cache of built base models [default: $FIRELOOP_MODEL_CACHE, else "
            "~/.cache/fireloop/models].",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Put local models' tokenizers in the Hugging Face cache, so clients that call
    AutoTokenizer.from_pretrained("fireloop/tiny") find them offline (HF_HUB_OFFLINE=1)."""
    from backend.models.cache import resolve_models_dir
    from backend.models.hf_cache import default_hub_dir, publish_tokenizer
    from backend.models.registry import UnknownModelError

    hub_dir = default_hub_dir(hf_home)
    for base_model in base_models:
        try:
            snapshot = publish_tokenizer(base_model, resolve_models_dir(models_dir), hub_dir)
        except UnknownModelError as exc:
            console.print(str(exc), markup=False)
            raise typer.Exit(2) from None
        print(f"{base_model}: {snapshot}")


@app.command()
def tasks() -> None:
    """The built-in toy tasks (`--set dataset=<name>`): what each teaches, an example, and
    which recipes take it."""
    from rich.table import Table

    from fireloop.help import task_rows

    table = Table("dataset", "teaches", "example row", "eval metric", "recipes", title="toy tasks")
    for row in task_rows():
        table.add_row(*row)
    console.print(table, markup=False)


@app.command("config-reference")
def config_reference(
    recipe: Annotated[str, typer.Argument(help="The recipe whose config to print.")] = "sft",
) -> None:
    """Print a recipe's config fields as a markdown table (the README's config reference)."""
    from fireloop.help import config_reference_markdown

    if recipe not in RECIPES:
        console.print(f"unknown recipe {recipe!r}; known: {recipe_names()}", markup=False)
        raise typer.Exit(2)
    print(config_reference_markdown(RECIPES[recipe].config_class()), end="")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="The run directory (it holds ledger.jsonl).")],
    out: Annotated[Path, typer.Option(help="Directory to write (must be empty, or --force).")],
    step: Annotated[
        int | None,
        typer.Option(
            help="Export the checkpoint saved after N optimizer steps: the ledger's "
            "checkpoint 'step-N' (its next_step). Default: the newest checkpoint.",
            show_default=False,
        ),
    ] = None,
    merged: Annotated[
        bool, typer.Option(help="LoRA runs: write the base model with the adapter merged in.")
    ] = False,
    force: Annotated[bool, typer.Option(help="Replace a non-empty --out directory.")] = False,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="Platform data directory holding the checkpoints, for a run on a standalone "
            "`fireloop backend` (default: <run-dir>/platform).",
            show_default=False,
        ),
    ] = None,
    model_cache: Annotated[
        Path | None,
        typer.Option(
            envvar="FIRELOOP_MODEL_CACHE",
            help="The base-model cache (default: ~/.cache/fireloop/models).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Export a run's checkpoint: a Hugging Face model directory (full-parameter runs, or
    --merged) or a PEFT adapter directory (LoRA runs) that transformers / peft load offline."""
    import warnings

    from fireloop.run_cli import set_offline_defaults

    set_offline_defaults()  # before transformers is imported: it reads them at import
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations
    from fireloop.export_cli import ExportRequest, run_and_report

    request = ExportRequest(
        run_dir=run_dir,
        out=out,
        step=step,
        merged=merged,
        force=force,
        data_dir=data_dir,
        model_cache=model_cache,
    )
    raise typer.Exit(run_and_report(request, console))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
