"""The one-way layering of design.md, checked by walking every import in the tree.

    deployments/ ──> flows/ ──> tasks/ ──> sdk/
                        └──────────┴────> algorithms/
    backend/   (server side: imports none of the above, meets sdk/ only over HTTP)

`fireloop/` holds only the command line, the top of the stack, and may import every layer.
torch is imported lazily (inside functions) outside `backend/` and `algorithms/`.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> top-level packages it must never import
FORBIDDEN: dict[str, set[str]] = {
    "sdk": {"prefect", "backend", "tasks", "flows", "deployments", "fireloop", "algorithms"},
    "algorithms": {
        "prefect",
        "httpx",
        "sdk",
        "backend",
        "tasks",
        "flows",
        "deployments",
        "fireloop",
    },
    "tasks": {"backend", "flows", "deployments", "fireloop"},
    "flows": {"deployments", "fireloop"},
    "deployments": {"fireloop"},
    "backend": {"sdk", "tasks", "flows", "deployments", "prefect", "fireloop", "algorithms"},
}
TORCH_EAGER_ALLOWED = {"backend", "algorithms"}


@dataclass(frozen=True)
class ImportSite:
    file: Path
    line: int
    module: str
    top_level: bool  # executed at import time (not inside a function or TYPE_CHECKING block)


def _imports(path: Path) -> list[ImportSite]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    sites: list[ImportSite] = []

    def visit(node: ast.AST, eager: bool) -> None:
        for child in ast.iter_child_nodes(node):
            child_eager = eager
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                child_eager = False
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                child_eager = False
            if isinstance(child, ast.Import):
                sites.extend(ImportSite(path, child.lineno, a.name, eager) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                sites.append(ImportSite(path, child.lineno, child.module, eager))
            visit(child, child_eager)

    visit(tree, True)
    return sites


def _package_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_never_imports_a_higher_or_sideways_layer(package: str) -> None:
    files = _package_files(package)
    assert files, f"{package}/ has no Python files"
    violations = [
        f"{site.file.relative_to(ROOT)}:{site.line} imports {site.module}"
        for path in files
        for site in _imports(path)
        if site.module.split(".")[0] in FORBIDDEN[package]
    ]
    assert not violations, "layering violations:\n" + "\n".join(violations)


@pytest.mark.parametrize("package", ["sdk", "tasks", "flows", "deployments", "fireloop"])
def test_torch_is_imported_lazily_outside_backend_and_algorithms(package: str) -> None:
    eager = [
        f"{site.file.relative_to(ROOT)}:{site.line}"
        for path in _package_files(package)
        for site in _imports(path)
        if site.top_level and site.module.split(".")[0] == "torch"
    ]
    assert not eager, "module-level torch imports:\n" + "\n".join(eager)


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """Guard against a checker that can never fail: it must flag a planted back-edge."""
    planted = tmp_path / "planted.py"
    planted.write_text("import prefect\n\ndef f():\n    import torch\n", encoding="utf-8")
    sites = {(s.module, s.top_level) for s in _imports(planted)}
    assert sites == {("prefect", True), ("torch", False)}


def test_importing_sdk_loads_neither_torch_nor_prefect_nor_the_server_stack() -> None:
    code = (
        "import sys, sdk; "
        "heavy = [m for m in ('torch', 'prefect', 'fastapi', 'uvicorn', 'backend', 'peft') "
        "if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "", f"`import sdk` pulled in: {out.stdout.strip()}"
