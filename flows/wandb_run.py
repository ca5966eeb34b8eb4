"""Weights & Biases for a run: one W&B run per fireloop run, continued by every flow retry.

The W&B run id is derived from the flow run (whose id a Prefect retry keeps), and a run resumed
by a *new* flow run takes the id its ledger recorded, so every attempt of one training run
writes to one W&B run (`resume="allow"`; the cookbook cannot, tinker-cookbook#281). Without
`WANDB_API_KEY` the run is offline and its files stay under `run_dir`. Metrics use `train/step`
as their axis (a resumed run rewinds to it). No key reaches W&B: the config logged leaves out
the platform, and W&B records no command line, program or machine metadata (a key can be an
argument).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from flows.config import WandbConfig

__all__ = ["WandbRun", "wandb_api_key", "wandb_run_id"]

logger = logging.getLogger(__name__)

_ID_UNSAFE = re.compile(r"[^a-zA-Z0-9_-]+")
_WANDB_KEY_ENV = "WANDB_API_KEY"


def wandb_api_key() -> str | None:
    """The W&B key from the environment (W&B's own convention), if any."""
    return os.environ.get(_WANDB_KEY_ENV) or None


def wandb_run_id(run_name: str, flow_run_id: str | None) -> str:
    """`<run_name>-<flow run id>`, restricted to the characters W&B ids allow."""
    return _ID_UNSAFE.sub("-", f"{run_name}-{flow_run_id or 'local'}")[:128]


class WandbRun:
    """An open W&B run; `log` takes per-step metrics, `finish` closes it (every attempt)."""

    def __init__(self, run: Any) -> None:
        self._run = run

    @property
    def id(self) -> str:
        return str(self._run.id)

    @classmethod
    def start(
        cls,
        config: WandbConfig,
        *,
        run_id: str,
        run_name: str,
        default_project: str,
        run_dir: Path | None,
        logged_config: BaseModel,
    ) -> WandbRun:
        """Start (or resume) the W&B run `run_id`; offline unless a key is present."""
        import wandb  # slow to import; only runs that log to W&B pay for it

        mode = config.mode or ("online" if wandb_api_key() else "offline")
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            id=run_id,
            resume="allow",
            entity=config.entity,
            project=config.project or default_project,
            name=config.run_name or run_name,
            mode=mode,
            dir=str(run_dir) if run_dir is not None else None,
            config=logged_config.model_dump(mode="json", exclude={"platform"}),
            settings=wandb.Settings(
                console="off",
                silent=True,
                x_disable_stats=True,
                disable_git=True,
                # W&B records the process's command line, host and program as run metadata,
                # and a key given as `--set platform.api_key=…` is on that command line.
                x_disable_meta=True,
                x_disable_machine_info=True,
                disable_code=True,
                save_code=False,
                program="fireloop",
            ),
        )
        run.define_metric("train/step")
        run.define_metric("*", step_metric="train/step")
        logger.info("W&B run %s (%s)", run.id, mode)
        return cls(run)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Log one step's metrics against `train/step`."""
        self._run.log({**metrics, "train/step": step})

    def finish(self, exit_code: int = 0) -> None:
        self._run.finish(exit_code=exit_code)
