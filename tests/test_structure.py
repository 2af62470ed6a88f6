"""The structure the design promises, checked from the source: which module may import which.

Layers, from the bottom: a module imports only its own layer or those below it. Ray is imported
only under hpsearch/tune/ and in submit.py, MLflow only in tracking.py, torch only in data,
models and trainable (the test-scoring helper the search uses is trainable's).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hpsearch"

LAYERS = [
    {"hpsearch", "hpsearch.errors", "hpsearch.entrypoints"},
    {"hpsearch.hyperparameters"},
    {"hpsearch.spec"},
    {"hpsearch.space", "hpsearch.plan"},
    {"hpsearch.data", "hpsearch.user_data", "hpsearch.models", "hpsearch.trainable"},
    {"hpsearch.record", "hpsearch.record.location", "hpsearch.record.trial_log", "hpsearch.record.checkpoints",
     "hpsearch.record.outputs", "hpsearch.record.study"},
    {"hpsearch.tracking", "hpsearch.report", "hpsearch.status", "hpsearch.progress"},
    {"hpsearch.tune", "hpsearch.tune.runtime", "hpsearch.tune.tuner", "hpsearch.tune.callbacks",
     "hpsearch.tune.searcher", "hpsearch.tune.scheduler", "hpsearch.tune.trial", "hpsearch.tune.final",
     "hpsearch.tune.snapshot", "hpsearch.tune.storage"},
    {"hpsearch.search"},
    {"hpsearch.submit"},
    {"hpsearch.cli"},
]
ONLY_IN = {
    "ray": lambda m: m.startswith("hpsearch.tune") or m == "hpsearch.submit",
    "mlflow": lambda m: m == "hpsearch.tracking",
    "torch": lambda m: m in ("hpsearch.data", "hpsearch.models", "hpsearch.trainable"),
    "torchvision": lambda m: m in ("hpsearch.data", "hpsearch.models", "hpsearch.trainable"),
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path, module: str) -> set[str]:
    """Every module a file imports, at the top or inside a function (``from x import y`` as x and x.y)."""
    names: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _layer(module: str) -> int | None:
    return next((i for i, layer in enumerate(LAYERS) if module in layer), None)


def test_every_module_has_a_layer() -> None:
    assert [m for m in _modules() if _layer(m) is None] == []


@pytest.mark.parametrize("module", sorted(_modules()))
def test_no_module_imports_upward(module: str) -> None:
    own = _layer(module)
    upward = sorted(name for name in _imports(_modules()[module], module)
                    if name in _modules() and _layer(name) > own)
    assert upward == [], f"{module} (layer {own}) imports a layer above it"


@pytest.mark.parametrize("module", sorted(_modules()))
def test_ray_mlflow_and_torch_stay_in_their_modules(module: str) -> None:
    imported = {name.split(".")[0] for name in _imports(_modules()[module], module)}
    wrong = sorted(lib for lib, allowed in ONLY_IN.items() if lib in imported and not allowed(module))
    assert wrong == [], f"{module} imports {wrong}"


def test_the_rules_see_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "x.py"
    source.write_text("def f():\n    import ray\n    from hpsearch.search import run_search\n    from . import y\n")
    assert {"ray", "hpsearch.search", "hpsearch.search.run_search", "hpsearch.record", "hpsearch.record.y"} <= \
        _imports(source, "hpsearch.record.x")


def test_long_functions_say_why() -> None:
    """No function over 60 lines without a comment on its first lines saying why it is one piece."""
    long = []
    for module, path in _modules().items():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                doc_end = node.body[0].end_lineno if ast.get_docstring(node) else node.lineno
                head = "\n".join(lines[node.lineno - 1: doc_end + 3])
                if "one piece:" not in head:
                    long.append(f"{module}.{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []
