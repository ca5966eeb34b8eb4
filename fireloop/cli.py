"""`fireloop`: run the embedded local platform, the demo pipeline, and (later) recipes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Workflow-orchestrated LLM training pipelines.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


@app.command()
def backend(
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
            envvar="FIREWORKS_API_KEY", help="Key clients must present.", show_default=False
        ),
    ] = None,
    account_id: Annotated[str, typer.Option(help="The one account served.")] = "local",
) -> None:
    """Serve the local platform (control plane, trainer gateway) in the foreground."""
    from backend import serve

    serve(host=host, port=port, data_dir=data_dir, api_key=api_key, account_id=account_id)


@app.command()
def demo(
    base_model: Annotated[str, typer.Option(help="Local base model.")] = "fireloop/tiny",
    data_dir: Annotated[
        Path | None, typer.Option(help="Platform data directory (default: a temporary one).")
    ] = None,
) -> None:
    """The main job on the embedded local platform (for now: the provisioning smoke run)."""
    from fireloop.smoke import SmokeStep, run_smoke

    def show(step: SmokeStep) -> None:
        console.print(f"[green]✓[/] {step.name} [dim]({step.seconds:.2f} s)[/] {step.detail}")

    console.print("[bold]fireloop demo[/]: provisioning smoke run on the embedded local platform")
    report = run_smoke(base_model=base_model, data_dir=data_dir, on_step=show)
    table = Table(title="smoke run")
    table.add_column("step")
    table.add_column("seconds", justify="right")
    for step in report.steps:
        table.add_row(step.name, f"{step.seconds:.2f}")
    console.print(table)
    console.print(
        f"job {report.job_id}: {report.final_job_state}; "
        f"deployment {report.deployment_id}: {report.deployment_after_delete}"
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
