"""kdpipe's own import graph, read from the sources (no module is imported): which kdpipe
modules and which third-party packages each module imports, at module level or inside a
function. Used by the tests of dvc.yaml's code deps and of the package's layers."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "kdpipe"


def modules() -> list[str]:
    """Every module of the package, dotted (``kdpipe.serving.predictor``)."""
    names = []
    for file in sorted(PACKAGE.rglob("*.py")):
        parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def module_file(name: str) -> Path | None:
    path = PACKAGE.parent / Path(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


@cache
def _imports(name: str) -> tuple[frozenset[str], frozenset[str]]:
    file = module_file(name)
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    own = frozenset(m for m in found if m.split(".")[0] == "kdpipe" and module_file(m))
    others = frozenset(m.split(".")[0] for m in found if m.split(".")[0] != "kdpipe")
    return own, others


def imported(name: str) -> set[str]:
    """kdpipe modules ``name`` imports anywhere in its file (functions' own imports too)."""
    return set(_imports(name)[0])


def third_party(name: str) -> set[str]:
    """Top-level names of the other packages (stdlib included) ``name`` imports."""
    return set(_imports(name)[1])


def closure(name: str) -> set[str]:
    """The source files (relative to src/kdpipe) that running module ``name`` may execute:
    its imports, theirs, and the packages' __init__ files on the way."""
    seen, todo = set(), [name]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))] + sorted(imported(module))
    return {module_file(m).relative_to(PACKAGE).as_posix() for m in seen}


def docstring_only(file: str) -> bool:
    """A package's ``__init__`` that holds only its docstring: it cannot change a result."""
    body = ast.parse((PACKAGE / file).read_text()).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
               for node in body)
