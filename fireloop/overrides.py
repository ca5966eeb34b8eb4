"""Recipe configs from the command line: a config file plus `--set key=value` overrides.

A file is JSON, YAML or TOML (by suffix). Overrides use dotted paths into the nested config
(`--set adam.grad_clip_norm=0.5`, `--set platform.base_url=http://…`); a value is parsed as
JSON when it parses (numbers, booleans, null, lists) and kept as a string otherwise. The
result is validated by the recipe's pydantic model, whose errors name the field.
"""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path
from typing import Any

import yaml

ConfigDict = dict[str, Any]


class ConfigFileError(ValueError):
    """A config file or an override that cannot be read; the message names which."""


def load_config_file(path: Path) -> ConfigDict:
    """The mapping in a JSON, YAML or TOML file."""
    if not path.is_file():
        raise ConfigFileError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            data: object = json.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            raise ConfigFileError(f"config file {path}: use .json, .yaml, .yml or .toml")
    except (json.JSONDecodeError, yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigFileError(f"config file {path} is not valid {path.suffix[1:]}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"config file {path} must hold a mapping, not {type(data).__name__}")
    return data


def parse_override(assignment: str) -> tuple[list[str], object]:
    """`a.b=3` → (["a", "b"], 3)."""
    key, sep, raw = assignment.partition("=")
    path = [part.strip() for part in key.split(".")]
    if not sep or not all(path):
        raise ConfigFileError(f"--set {assignment!r}: expected key=value, e.g. max_steps=200")
    try:
        value: object = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return path, value


def apply_overrides(config: ConfigDict, assignments: list[str]) -> ConfigDict:
    """A copy of `config` with every `key=value` assignment applied in order."""
    result: ConfigDict = copy.deepcopy(config)
    for assignment in assignments:
        path, value = parse_override(assignment)
        node = result
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigFileError(f"--set {assignment!r}: {part!r} is not a mapping")
            node = child
        node[path[-1]] = value
    return result
