"""No code path unpickles what a user, a cache or a registry handed it: a source scan (the
AST, so strings and comments don't count) for every loader that can run pickle."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "kdpipe"


def calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            yield node, owner, name


def keyword(node, name):
    return next((k.value for k in node.keywords if k.arg == name), None)


def test_no_loader_can_unpickle():
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imports = {alias.name for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)
                   for alias in n.names}
        if imports & {"dill", "cloudpickle", "joblib", "shelve", "marshal"}:
            problems.append(f"{path.name}: imports a pickle-based module")
        # pickle itself only for its error class (what a refused torch.load raises).
        used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                and getattr(n.value, "id", "") == "pickle"}
        if used - {"UnpicklingError"}:
            problems.append(f"{path.name}: uses pickle.{', pickle.'.join(sorted(used))}")
        for node, owner, name in calls(tree):
            where = f"{path.relative_to(SRC)}:{node.lineno}"
            if owner == "torch" and name == "load":
                flag = keyword(node, "weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if owner == "np" and name == "load":
                flag = keyword(node, "allow_pickle")
                if not (isinstance(flag, ast.Constant) and flag.value is False):
                    problems.append(f"{where}: np.load without allow_pickle=False")
            if name in {"read_pickle", "unsafe_load"} or (owner == "yaml" and name == "load"):
                problems.append(f"{where}: {owner}.{name}")
            if name == "YAML":  # ruamel.yaml: its round-trip and safe loaders build no objects
                typ = keyword(node, "typ")
                if not (isinstance(typ, ast.Constant) and typ.value in {"rt", "safe"}):
                    problems.append(f"{where}: ruamel YAML() without typ='rt' or 'safe'")
    assert problems == []
