"""`fireloop serve` and `fireloop deployments`: the deployment catalog (deployments/) served from
this process, listed, or rendered as the `prefect.yaml` that `prefect deploy --all` reads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

__all__ = ["deployments_app", "serve"]

console = Console()
deployments_app = typer.Typer(
    help="The Prefect deployments of the recipe flows (deployments/catalog.py).",
    no_args_is_help=True,
)


def serve(
    only: Annotated[
        list[str] | None,
        typer.Option(
            "--only",
            help="Serve only this deployment (repeatable), e.g. sft-nightly or sft/sft-nightly.",
            show_default=False,
        ),
    ] = None,
    pause_on_shutdown: Annotated[
        bool,
        typer.Option(
            help="Pause the schedules when this process stops (--no-pause-on-shutdown under "
            "systemd or Kubernetes, where a restart should keep them running)."
        ),
    ] = True,
    limit: Annotated[
        int | None,
        typer.Option(help="Flow runs at once in this process.", min=1, show_default=False),
    ] = None,
) -> None:
    """Serve the deployments (schedules included) from this process until Ctrl-C: each flow run
    runs in a subprocess. Needs a Prefect server (PREFECT_API_URL)."""
    from deployments.serve import ServeError, require_api_url, selected, serve_catalog

    try:
        require_api_url()
        selected(only or [])
    except ServeError as exc:
        console.print(str(exc), markup=False, soft_wrap=True)
        raise typer.Exit(2) from None
    serve_catalog(only or [], pause_on_shutdown=pause_on_shutdown, limit=limit)


@deployments_app.command("list")
def list_deployments() -> None:
    """The catalog: name, entrypoint, schedule, concurrency, tags."""
    from rich.table import Table

    from deployments.catalog import CATALOG

    table = Table("deployment", "entrypoint", "schedule (UTC)", "on overlap", "tags")
    for spec in CATALOG:
        schedule = spec.schedule.cron if spec.schedule else "-"
        table.add_row(
            spec.full_name,
            spec.recipe_flow.entrypoint,
            schedule,
            spec.concurrency.value,
            ", ".join(spec.all_tags),
        )
    console.print(table, markup=False)


@deployments_app.command("yaml")
def deployments_yaml(
    write: Annotated[
        bool, typer.Option("--write", help="Write prefect.yaml at the repository root.")
    ] = False,
    check: Annotated[
        bool, typer.Option("--check", help="Exit 1 when prefect.yaml differs from the catalog.")
    ] = False,
) -> None:
    """Print prefect.yaml as the catalog renders it (--write: update the file)."""
    from deployments.prefect_yaml import PREFECT_YAML, render_prefect_yaml

    text = render_prefect_yaml()
    path = Path(PREFECT_YAML)
    if check:
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current != text:
            console.print(f"{path} differs from the catalog: fireloop deployments yaml --write")
            raise typer.Exit(1)
        return
    if write:
        path.write_text(text, encoding="utf-8")
        console.print(f"wrote {path}", markup=False)
        return
    typer.echo(text, nl=False)
