"""List filters (`?filter=`) in the subset of the AIP-160 syntax that platform clients send.

The published SDK and its recipes filter shape-version lists with conjunctions such as
`snapshot.base_model="accounts/fireworks/models/qwen3-8b" AND snapshot.trainer_mode="POLICY_TRAINER"
AND snapshot.parameter_count>=8000000000 AND latest_validated=true`. A filter here is terms joined
by `AND`, each `<field><op><value>` with op one of `= != < <= > >=` and a quoted string, an
integer or `true`/`false` as value. A field the list does not know is a 400 naming it, so a typo
never silently matches everything.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict

from backend.errors import ApiError

__all__ = ["FieldKind", "FilterTerm", "FilterValue", "matches", "parse_filter"]

FilterValue = str | int | bool
FieldKind = Literal["str", "int", "bool"]
Op = Literal["=", "!=", "<", "<=", ">", ">="]

_TERM = re.compile(
    r'^\s*(?P<field>[A-Za-z_][A-Za-z0-9_.]*)\s*(?P<op>!=|<=|>=|=|<|>)\s*(?P<value>"[^"]*"|\S+)\s*$'
)
_AND = re.compile(r"\s+AND\s+")
_ORDERED_OPS = frozenset({"<", "<=", ">", ">="})


class FilterTerm(BaseModel):
    """One comparison of a filter: `field op value`."""

    model_config = ConfigDict(frozen=True)

    field: str
    op: Op
    value: FilterValue


def parse_filter(expr: str, fields: Mapping[str, FieldKind]) -> list[FilterTerm]:
    """The terms of `expr` (empty: no terms), each checked against the list's `fields`."""
    if not expr.strip():
        return []
    return [_parse_term(part, expr, fields) for part in _AND.split(expr.strip())]


def matches(terms: list[FilterTerm], record: Mapping[str, FilterValue]) -> bool:
    """Whether `record` (field name → value, every filterable field present) meets every term."""
    return all(_holds(term, record[term.field]) for term in terms)


def _parse_term(part: str, expr: str, fields: Mapping[str, FieldKind]) -> FilterTerm:
    match = _TERM.match(part)
    if match is None:
        raise ApiError.invalid_argument(
            f"filter {expr!r}: cannot read {part.strip()!r}; expected <field><op><value> terms "
            "joined by AND, op one of = != < <= > >="
        )
    field, op, raw = match["field"], match["op"], match["value"]
    kind = fields.get(field)
    if kind is None:
        known = ", ".join(sorted(fields))
        raise ApiError.invalid_argument(
            f"filter {expr!r}: field {field!r} is not supported here; filterable fields: {known}"
        )
    value = _value(raw, kind, field, expr)
    if op in _ORDERED_OPS and kind != "int":
        raise ApiError.invalid_argument(
            f"filter {expr!r}: {field} is a {kind}; only = and != compare it"
        )
    return FilterTerm(field=field, op=op, value=value)


def _value(raw: str, kind: FieldKind, field: str, expr: str) -> FilterValue:
    if kind == "str":
        return raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] == '"' else raw
    if kind == "bool" and raw in ("true", "false"):
        return raw == "true"
    if kind == "int" and re.fullmatch(r"-?\d+", raw):
        return int(raw)
    raise ApiError.invalid_argument(f"filter {expr!r}: {field} needs a {kind} value, not {raw!r}")


def _holds(term: FilterTerm, actual: FilterValue) -> bool:
    if term.op == "=":
        return actual == term.value
    if term.op == "!=":
        return actual != term.value
    # Ordered comparisons are only parsed for int fields.
    assert isinstance(actual, int) and isinstance(term.value, int)
    if term.op == "<":
        return actual < term.value
    if term.op == "<=":
        return actual <= term.value
    if term.op == ">":
        return actual > term.value
    return actual >= term.value
