"""The recipes `fireloop run` knows: each name with its config class and its entry point.

The CLI builds `run <recipe>`, `config-reference <recipe>` and the `tasks` table from this one
table. Each entry names modules instead of holding the classes, because importing a flow
imports the training stack (seconds) that `fireloop --help` and the other commands must not pay.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

if TYPE_CHECKING:
    from flows.config import RecipeConfig
    from flows.lifecycle import RunResult
    from flows.monitoring import ProgressCallback

__all__ = ["RECIPES", "Recipe", "RunEntryPoint", "recipe_names"]

# `run_<recipe>(config, on_progress)`: runs the recipe's flow in this process.
RunEntryPoint = Callable[[Any, "ProgressCallback | None"], "RunResult"]


@dataclass(frozen=True)
class Recipe:
    """One runnable recipe: its config class and entry point, named by module and attribute."""

    name: str  # `fireloop run <name>`, as the config's `recipe` says
    title: str  # how people write it: SFT, DPO, ORPO
    data: str  # what its `dataset` takes, for `run <name> --help`
    config_path: str  # "module:ClassName"
    entry_path: str  # "module:function"

    def config_class(self) -> type[RecipeConfig]:
        return cast("type[RecipeConfig]", _load(self.config_path))

    def entry_point(self) -> RunEntryPoint:
        return cast(RunEntryPoint, _load(self.entry_path))

    @property
    def help(self) -> str:
        return (
            f"Run the {self.title} flow (embedded local platform unless the config names one). "
            f"Data: {self.data} (`fireloop tasks`); models: `fireloop models`. Ctrl-C stops it "
            "within seconds; the same command again resumes from its last checkpoint."
        )


def _load(path: str) -> object:
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


RECIPES: Final[Mapping[str, Recipe]] = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            "sft",
            "SFT",
            "a chat JSONL file or a toy task",
            "flows.config:SFTConfig",
            "flows.sft:run_sft",
        ),
        Recipe(
            "dpo",
            "DPO",
            "a preference JSONL file (chosen/rejected, scored samples or OpenAI pairs) or a toy "
            "task",
            "flows.config:DPOConfig",
            "flows.dpo:run_dpo",
        ),
        Recipe(
            "orpo",
            "ORPO",
            "a preference JSONL file (chosen/rejected, scored samples or OpenAI pairs) or a toy "
            "task",
            "flows.config:ORPOConfig",
            "flows.orpo:run_orpo",
        ),
        Recipe(
            "rl",
            "RL",
            "an RL prompt JSONL file (messages, ground_truth) or an RL toy task",
            "flows.config:RLConfig",
            "flows.rl:run_rl",
        ),
    )
}


def recipe_names() -> str:
    """`sft, dpo, orpo`: the known recipes, for messages."""
    return ", ".join(RECIPES)
