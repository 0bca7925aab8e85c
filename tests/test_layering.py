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
