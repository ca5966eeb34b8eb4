"""The one-way layering of the architecture, checked by walking every import in the tree.

    deployments/ ──> flows/ ──> tasks/ ──> sdk/
                        └──────────┴────> algorithms/
    backend/   (server side: imports none of the above, meets sdk/ only over HTTP)

`fireloop/` holds only the command line, the top of the stack, and may import every layer.
torch is imported lazily (inside functions) outside `backend/` and `algorithms/`.

flows/ and tasks/ see the SDK's public surface only: its own error tree, never tinker's
exception types or httpx (tinker's wire types, `tinker.types`, are the training API's data and
may be used), and no private `sdk._*` module. Only `flows/embedded.py` starts a local platform
and so imports `backend`.
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
    "tasks": {"backend", "flows", "deployments", "fireloop", "httpx"},
    "flows": {"backend", "deployments", "fireloop", "httpx"},
    "deployments": {"fireloop"},
    "backend": {"sdk", "tasks", "flows", "deployments", "prefect", "fireloop", "algorithms"},
}
TORCH_EAGER_ALLOWED = {"backend", "algorithms"}
# The one module of a package that may import a layer FORBIDDEN to the rest of it.
ALLOWED_EXCEPTIONS: dict[str, dict[str, str]] = {"flows": {"backend": "flows/embedded.py"}}
# Packages that may use tinker's wire types but nothing else of tinker.
TINKER_TYPES_ONLY = ("flows", "tasks")


@dataclass(frozen=True)
class ImportSite:
    file: Path
    line: int
    module: str
    top_level: bool  # executed at import time (not inside a function or TYPE_CHECKING block)
    names: tuple[str, ...] = ()  # what `from module import ...` takes; () for `import module`


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
                names = tuple(alias.name for alias in child.names)
                sites.append(ImportSite(path, child.lineno, child.module, eager, names))
            visit(child, child_eager)

    visit(tree, True)
    return sites


def _package_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_never_imports_a_higher_or_sideways_layer(package: str) -> None:
    files = _package_files(package)
    assert files, f"{package}/ has no Python files"
    allowed = ALLOWED_EXCEPTIONS.get(package, {})
    violations = [
        f"{site.file.relative_to(ROOT)}:{site.line} imports {site.module}"
        for path in files
        for site in _imports(path)
        if (top := site.module.split(".")[0]) in FORBIDDEN[package]
        and allowed.get(top) != path.relative_to(ROOT).as_posix()
    ]
    assert not violations, "layering violations:\n" + "\n".join(violations)


def _foreign_sdk_surface(site: ImportSite) -> bool:
    """Whether `site` reaches past the SDK's public surface: tinker beyond its wire types, or a
    private `sdk._*` module."""
    parts = site.module.split(".")
    if parts[0] == "sdk":
        return any(part.startswith("_") for part in parts[1:])
    if parts[0] != "tinker":
        return False
    if len(parts) > 1:
        return parts[1] != "types"
    return not site.names or any(name != "types" for name in site.names)


@pytest.mark.parametrize("package", TINKER_TYPES_ONLY)
def test_flows_and_tasks_use_only_the_public_sdk_and_tinker_wire_types(package: str) -> None:
    violations = [
        f"{site.file.relative_to(ROOT)}:{site.line} imports {site.module} {list(site.names)}"
        for path in _package_files(package)
        for site in _imports(path)
        if _foreign_sdk_surface(site)
    ]
    assert not violations, "imports past the SDK's public surface:\n" + "\n".join(violations)


def test_the_surface_check_tells_wire_types_from_exceptions(tmp_path: Path) -> None:
    """Guard against a check that can never fail, or that refuses what is allowed."""
    planted = tmp_path / "planted.py"
    planted.write_text(
        "import tinker\n"
        "from tinker import types\n"
        "from tinker import RequestFailedError\n"
        "from tinker.types import Datum\n"
        "from tinker.lib import api_future\n"
        "from sdk import WeightSyncer\n"
        "from sdk._closing import ClosesOnExit\n",
        encoding="utf-8",
    )
    flagged = [site.module for site in _imports(planted) if _foreign_sdk_surface(site)]
    assert flagged == ["tinker", "tinker", "tinker.lib", "sdk._closing"]


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
