"""The layout docs/architecture.md promises: no import cycles between packages, a library that never
imports its CLI or leans on its test support, and modules small enough to read (no Ray, no torch: it parses
the sources)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rxray"
MAX_MODULE_LINES = 400


def _package_of(module: str) -> str:
    """`rxray.train.launch` -> `train`; top-level modules (`rxray.config`) are the foundation, one node each."""
    parts = module.split(".")
    if len(parts) == 1:
        return module  # rxray/__init__.py
    return parts[1] if len(parts) > 2 or (PACKAGE / parts[1]).is_dir() else module


def _imports() -> dict[str, set[str]]:
    """Package -> the other rxray packages/modules it imports (at module level or inside functions)."""
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        source = _package_of(module.removesuffix(".__init__"))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rxray."):
                target = _package_of(node.module)
                if target != source:
                    edges.setdefault(source, set()).add(target)
    return edges


def test_no_import_cycles_between_packages():
    edges = _imports()
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt == goal:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    # A cycle may pass through a top-level module (data -> rxray.config -> models -> data): it counts.
    cycles = sorted({tuple(sorted((a, b))) for a in packages for b in packages if a != b
                     and reaches(a, b) and reaches(b, a)})
    assert not cycles, f"packages that import each other: {cycles}"


def test_the_library_never_imports_the_cli():
    offenders = [str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
                 if p.name != "cli.py" and "rxray.cli" in p.read_text()]
    assert not offenders


def test_the_test_support_stays_out_of_the_wheel():
    import tomllib

    from setuptools import find_packages

    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    shipped = find_packages(str(PACKAGE.parent), **project["tool"]["setuptools"]["packages"]["find"])
    assert "rxray.bench" in shipped and not [p for p in shipped if not p.startswith("rxray") or "testing" in p]
    # Only the chaos benchmark may use it, and only when a source checkout installed it (a guarded import).
    users = {str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py") if "rxray_testing" in p.read_text()}
    assert users == {"rxray/bench/chaos.py"}
    assert "except ImportError" in (PACKAGE / "bench" / "chaos.py").read_text()


def test_no_module_over_the_size_a_newcomer_reads():
    big = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not big, f"split along a seam: {big}"
