"""Comments and docstrings must be readable from this repository alone.

A citation of a design note's section, failure-mode code or file name points into notes that
are not part of the project, so a reader who cloned it cannot follow it. Code says the reason
in plain words, or points at the project's own `docs/` (the wire facts are in
docs/platform-contract.md).
This test scans every comment and docstring of the library packages for such citations.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The codes that were cited (the design notes' endpoint and failure-mode ids), listed exactly so
# that a GPU name, a storage name or a number format in a comment never matches.
_CODE = (
    r"A1|T[1-6]|O1|S[12]|D[1-5]|H[1-3]|I1|X1|R(?:10|[1-9])|C[1-5]|W(?:1[0-2]|[1-9])|P[1-8]|F[1-7]"
    r"|M[12]"
)
CITATION = re.compile(
    r"§ ?\d"
    r"|\b(?:spec|design|recipes|failure-modes|platform-api|prefect|models|tinker-protocol|seed)"
    r"\.md\b"
    r"|\.\./shared/|\bspec/\w|\bfailure-modes\b"
    rf"|(?<![\w./-])(?:{_CODE})(?![\w-])"
)

# Packages whose comments and docstrings must carry no citation, each with the reason it is
# skipped for now (None: checked). The allow-list of single lines is empty on purpose.
PACKAGES: dict[str, str | None] = {
    "sdk": None,
    "backend": None,
    "algorithms": None,
    "fireloop": None,
    "tasks": None,
    "flows": None,
}


def _docstrings(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """(first line, text) of the module's, every class's and every function's docstring."""
    nodes: list[ast.AST] = [tree]
    nodes += [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
    ]
    for node in nodes:
        body = getattr(node, "body", [])
        if (
            body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            yield body[0].lineno, body[0].value.value


def _comments(source: str) -> Iterator[tuple[int, str]]:
    """(line, text) of every `#` comment."""
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string


def citations(path: Path, root: Path = ROOT) -> list[str]:
    """`path:line: text` for each comment or docstring line of `path` that cites a spec code."""
    source = path.read_text(encoding="utf-8")
    texts = list(_comments(source)) + list(_docstrings(ast.parse(source, str(path))))
    found = [
        f"{path.relative_to(root)}:{first_line + offset}: {line.strip()}"
        for first_line, text in texts
        for offset, line in enumerate(text.splitlines())
        if CITATION.search(line)
    ]
    return sorted(found)


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_comments_cite_no_outside_document(package: str) -> None:
    skip_reason = PACKAGES[package]
    if skip_reason is not None:
        pytest.skip(skip_reason)
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    found = [hit for path in files for hit in citations(path)]
    assert not found, "say the reason in plain words, or point at docs/:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "text",
    [
        "# the deployment would serve stale weights (W7)",
        "# see failure-modes P5",
        '"""Readiness loop (spec §6 step 4)."""',
        "# rules of platform-api.md",
        "# the T5 listing of the job",
        "# as in ../shared/design.md",
    ],
)
def test_a_citation_is_found(text: str, tmp_path: Path) -> None:
    module = tmp_path / "cited.py"
    module.write_text(f"{text}\nX = 1\n" if text.startswith("#") else f"{text}\n")
    assert citations(module, tmp_path), f"{text!r} was not reported"


@pytest.mark.parametrize(
    "text",
    [
        "# one H100 or A100, an S3 bucket, fp8 weights",
        "# step-4-9c1e4f2a, tokens_BT, W_q",
        '"""The tiny model: 2 layers, d_model 64."""',
    ],
)
def test_ordinary_text_is_not_a_citation(text: str, tmp_path: Path) -> None:
    module = tmp_path / "plain.py"
    module.write_text(f"{text}\nX = 1\n" if text.startswith("#") else f"{text}\n")
    assert not citations(module, tmp_path)


def test_string_literals_are_not_scanned(tmp_path: Path) -> None:
    module = tmp_path / "literal.py"
    module.write_text('BUCKETS = ["S3", "W4", "§10"]\n')
    assert not citations(module, tmp_path)
