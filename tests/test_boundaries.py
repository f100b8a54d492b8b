"""Layer boundaries, read from the source with `ast`: only orchestrator/ may import ray or mlflow.

models/ is pure torch and pipelines/ reaches Ray and MLflow through orchestrator/, so any import of
ray or mlflow in those two packages, at module level or inside a function, fails here with its file
and line. models/ is the lowest layer: it imports nothing from orchestrator/ or pipelines/ (which
would bring ray and mlflow in with them). Every error class is a `models.errors.UserError`.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_RAY_OR_MLFLOW = ("models", "pipelines")


def sources(*packages: str) -> list[Path]:
    """Every .py file under the given top-level packages."""
    return sorted(p for pkg in packages for p in (ROOT / pkg).rglob("*.py"))


def imported_modules(tree: ast.AST):
    """(node, absolute module name) for every import in a tree, nested ones and import_module("...") included."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node, node.module
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ast.unparse(node.func) in ("__import__", "import_module", "importlib.import_module")):
            yield node, node.args[0].value


def imports_of(path: Path, roots: tuple[str, ...]) -> list[str]:
    """`file:line: statement` for each import in `path` of a module under one of `roots`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    hits = sorted({(node.lineno, ast.unparse(node)) for node, name in imported_modules(tree) if name.split(".")[0] in roots})
    return [f"{rel}:{line}: {code}" for line, code in hits]


def test_models_and_pipelines_import_no_ray_or_mlflow():
    files = sources(*NO_RAY_OR_MLFLOW)
    assert len(files) > 50, "the packages were not found"
    bad = [hit for f in files for hit in imports_of(f, ("ray", "mlflow"))]
    assert not bad, "ray and mlflow belong in orchestrator/ only:\n" + "\n".join(bad)


def test_models_import_nothing_from_orchestrator_or_pipelines():
    bad = [hit for f in sources("models") for hit in imports_of(f, ("orchestrator", "pipelines"))]
    assert not bad, "models/ is the lowest layer:\n" + "\n".join(bad)


def test_the_check_finds_every_form_of_import(tmp_path):
    f = tmp_path / "planted.py"
    f.write_text(
        "import os, ray.tune\n"
        "from mlflow.tracking import MlflowClient\n"
        "import rayon, mlflowish  # other packages\n"
        "from . import ray\n"
        "def log():\n"
        "    import mlflow\n"
        "    class Lazy:\n"
        "        def f(self):\n"
        "            return importlib.import_module('ray.train')\n"
    )
    assert imports_of(f, ("ray", "mlflow")) == [
        f"{f}:1: import os, ray.tune",
        f"{f}:2: from mlflow.tracking import MlflowClient",
        f"{f}:6: import mlflow",
        f"{f}:9: importlib.import_module('ray.train')",
    ]


def test_every_error_class_is_a_user_error():
    """CLIs turn a UserError into one line and exit code 2: an error class outside it would be a traceback."""
    bad, n = [], 0
    for f in sources("models", "orchestrator", "pipelines"):
        for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error") and node.name != "UserError":
                n += 1
                if "UserError" not in [ast.unparse(b) for b in node.bases]:
                    bad.append(f"{f.relative_to(ROOT)}:{node.lineno}: class {node.name}")
    assert n >= 10 and not bad, "subclass models.errors.UserError:\n" + "\n".join(bad)
