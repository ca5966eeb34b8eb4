"""What a person can ask the CLI: the config fields of a recipe, the local models, the toy tasks.

Everything here is generated from the code that uses it (the pydantic config model, the local
model registry, the toy-task table), so `fireloop run <recipe> --help`, `fireloop models`,
`fireloop tasks` and the README's config reference cannot drift from what a run accepts.
Nested config parts are flattened into the dotted keys `--set` takes (`adam.beta1`).
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

if typing.TYPE_CHECKING:
    from algorithms.preference import PreferenceRow

__all__ = [
    "FieldHelp",
    "config_fields",
    "config_reference_markdown",
    "fields_epilog",
    "model_rows",
    "task_rows",
]

REFERENCE_START: Final = "<!-- config-reference:{recipe}:start -->"
REFERENCE_END: Final = "<!-- config-reference:{recipe}:end -->"


@dataclass(frozen=True)
class FieldHelp:
    """One config field as a person reads it: dotted key, type, default, one line of help."""

    key: str
    type: str
    default: str
    help: str


def config_fields(model: type[BaseModel], prefix: str = "") -> list[FieldHelp]:
    """Every field of `model`, nested parts flattened after a row for the part itself."""
    rows: list[FieldHelp] = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        part = _part_of(info.annotation)
        description = (info.description or "").rstrip(".")
        if part is None:
            rows.append(FieldHelp(key, _type_name(info.annotation), _default(info), description))
            continue
        rows.append(FieldHelp(key, "section", _part_default(info), description))
        rows.extend(config_fields(part, f"{key}."))
    return rows


def _part_of(annotation: Any) -> type[BaseModel] | None:
    """The config part (a pydantic model) a field holds, also when it is optional."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _type_name(annotation: Any) -> str:
    """`int`, `float?` (optional), `constant|linear|cosine` (a choice), `secret`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return "|".join(str(arg) for arg in args)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(arg) for arg in args if arg is not type(None)]
        optional = "?" if type(None) in args else ""
        return " | ".join(names) + optional
    if annotation is SecretStr:
        return "secret"
    return getattr(annotation, "__name__", str(annotation))


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        return "(generated)"
    if info.default is PydanticUndefined:
        return "(required)"
    if info.default is None:
        return ""
    if isinstance(info.default, bool):
        return str(info.default).lower()
    return str(info.default)


def _part_default(info: FieldInfo) -> str:
    return "(empty)" if info.default is None else ""


def fields_epilog(model: type[BaseModel]) -> str:
    """The config fields as aligned plain-text lines, for a command's `--help` epilog."""
    from rich.markup import escape

    rows = config_fields(model)
    key_width = max(len(row.key) for row in rows)
    lines = ["Config fields (set in --config FILE or with --set key=value; dotted keys nest):"]
    for row in rows:
        default = f" [default: {row.default}]" if row.default else ""
        lines.append(f"  {row.key:<{key_width}}  {row.type}{default}  {row.help}")
    # Typer renders the epilog as rich markup: brackets in types and defaults stay literal.
    return escape("\n".join(lines))


def config_reference_markdown(model: type[BaseModel]) -> str:
    """The config fields as a markdown table, for the README's config reference."""
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for row in config_fields(model):
        default = f"`{row.default}`" if row.default else ""
        cells = (
            f"`{row.key}`",
            _md_text(row.type),
            default.replace("|", "\\|"),
            _md_text(row.help),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _md_text(text: str) -> str:
    """Plain text in a table cell: `|` would end the cell, `<x>` would vanish as an HTML tag."""
    return text.replace("|", "\\|").replace("<", "\\<")


def model_rows() -> Iterator[tuple[str, str, str, str]]:
    """(name, parameters, context, what it is for) of every local base model."""
    from backend.models.registry import REGISTERED_MODELS

    for spec in REGISTERED_MODELS.values():
        yield spec.hf_name, spec.parameters, str(spec.context_length), spec.description


def task_rows() -> Iterator[tuple[str, str, str, str, str]]:
    """(name, what it teaches, an example, its eval metric, the recipes that take it) of every
    toy task."""
    from algorithms.preference import PREFERENCE_TASKS
    from algorithms.rl_data import RL_TASKS
    from algorithms.toy_tasks import TOY_TASKS

    chat_recipes, pair_recipes = _recipes_by_data()
    for task in TOY_TASKS.values():
        row = task.generate(1, seed=0, split="train")[0]
        example = "  ".join(f"{m.role}: {m.content!r}" for m in row.messages)
        # RL samples prompts instead of training on chat rows: only a task that is also an RL
        # task (prompts and a built-in reward) lists it, once `fireloop run rl` exists.
        names = chat_recipes.split(", ")
        recipes = ", ".join(n for n in names if n != "rl" or task.name in RL_TASKS)
        # RL scores the task by its reward on sampled completions, not by exact match.
        rl = "rl" in names and task.name in RL_TASKS
        metric = f"{task.metric}; rl: eval/reward" if rl else task.metric
        yield task.name, task.description, example, metric, recipes
    for pair_task in PREFERENCE_TASKS.values():
        pair = pair_task.generate(1, seed=0, split="train")[0]
        example = _pair_example(pair)
        yield pair_task.name, pair_task.description, example, pair_task.metric, pair_recipes


def _recipes_by_data() -> tuple[str, str]:
    """The recipes that train on chat rows, and those that train on preference pairs (their
    configs say which: a preference recipe's config is a `PreferenceConfig`)."""
    from fireloop.recipes import RECIPES
    from flows.config import PreferenceConfig

    pairs = {n for n, r in RECIPES.items() if issubclass(r.config_class(), PreferenceConfig)}
    chat = ", ".join(name for name in RECIPES if name not in pairs)
    return chat, ", ".join(name for name in RECIPES if name in pairs)


def _pair_example(pair: PreferenceRow) -> str:
    """The shared prompt, then the chosen and rejected replies (the last message of each)."""
    if isinstance(pair.chosen, str) or isinstance(pair.rejected, str):
        return f"chosen: {pair.chosen!r}  rejected: {pair.rejected!r}"
    prompt = "  ".join(f"{m.role}: {m.content!r}" for m in pair.chosen[:-1])
    return f"{prompt}  chosen: {pair.chosen[-1].content!r}  rejected: {pair.rejected[-1].content!r}"
