"""Module boundaries: one owner per on-disk format; the library imports neither stage."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("pipeline", "preprocess", "train")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _sources() -> dict[str, set[str]]:
    return {str(p.relative_to(REPO)): _imports(p) for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


def test_only_the_cache_package_imports_zarr() -> None:
    users = {f for f, names in _sources().items() if names & {"zarr", "numcodecs"}}
    assert users and all(f.startswith("pipeline/cache/") for f in users), users


def test_only_nifti_module_imports_nibabel() -> None:
    users = {f for f, names in _sources().items() if "nibabel" in names}
    assert users == {"pipeline/nifti.py"}, users


def test_library_imports_no_stage() -> None:
    bad = {f for f, names in _sources().items() if f.startswith("pipeline/") and names & {"preprocess", "train"}}
    assert not bad, bad


def test_only_the_cache_package_talks_to_storage_backends() -> None:
    users = {f for f, names in _sources().items() if names & {"upath", "fsspec", "s3fs"}}
    assert users and all(f.startswith("pipeline/cache/") for f in users), users


def test_every_console_script_answers_help() -> None:
    import re
    import shutil
    import subprocess
    import sys

    scripts = re.findall(r'^(brats-[a-z]+) = "([a-z_.]+):main"', (REPO / "pyproject.toml").read_text(), re.M)
    assert {name for name, _ in scripts} >= {"brats-preprocess", "brats-train", "brats-cv", "brats-predict",
                                             "brats-evaluate", "brats-cache"}
    for name, module in scripts:
        exe = shutil.which(name, path=str(Path(sys.executable).parent))
        # an installed command where the project is installed; its module's main as `python -m` otherwise
        cmd = [exe, "--help"] if exe else [sys.executable, "-c", f"import sys; from {module} import main; "
                                                                 "sys.exit(main(['--help']))"]
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and "usage:" in res.stdout, (name, res.stderr[-500:])


def _import_time_nodes(tree: ast.Module) -> list[ast.stmt]:
    """The statements run when a module is imported: its body, and inside ``if``/``try``/``with`` blocks
    (an ``if __name__ == "__main__":`` import included), not function bodies."""
    out: list[ast.stmt] = []
    todo: list[ast.stmt] = list(tree.body)
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, (ast.If, ast.Try, ast.With, ast.ClassDef)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, field, []):
                    todo.extend(child.body if isinstance(child, ast.ExceptHandler) else [child])
    return out


def _module_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports at module level (lazy imports in functions excluded)."""
    modules = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in _import_time_nodes(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    found.add(t)
        graph[name] = found
    return graph


def test_no_import_circle() -> None:
    graph = _module_graph()
    assert "train.augment.spatial" in graph and "train.cli" in graph
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    # a package's __init__ importing its own modules is no circle unless one of them imports the package back
    assert not cycles, cycles
    assert "train.__main__" not in {m for deps in graph.values() for m in deps}  # no module imports a CLI entry


def test_the_prediction_library_stands_apart_from_the_stages() -> None:
    graph = _module_graph()
    stages = {"train.predict", "train.evaluate", "train.postprocess", "train.cv", "train.cli", "train.__main__"}
    assert not graph["train.predictor"] & stages, graph["train.predictor"]
    # choosing post-processing and cross-validating predict probabilities: the library, not the stage's CLI
    for user in ("train.postprocess", "train.cv"):
        assert "train.predictor" in graph[user] and "train.predict" not in graph[user], (user, graph[user])
