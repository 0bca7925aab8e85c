"""Our metrics against the BraTS organisers' own evaluation package, on constructed cases.

The official package (``brats-evaluation`` on PyPI, the BraTS 2025 evaluation, built on panoptica) pins its
own pandas, SimpleITK and panoptica, so it lives in its own environment: ``make setup-official`` (and
``.ci/run``) installs it into ``.venv-official``; ``BRATS_OFFICIAL_PYTHON`` names another interpreter. The
cases are scored by both, and the scores must agree to 1e-3 Dice and 0.1 mm HD95.

What the comparison pins down: Dice is the same; the package's HD95 is MedPy's pooled definition
(``--hd95 pooled``) and is measured in voxels, whatever the header's spacing (on BraTS data, 1 mm
isotropic, that is millimetres). Where exactly one mask is empty it gives no finite HD95; we give 374 mm
(``brats``) or 373.13 mm (``pooled``), the values of the 2023 challenge code and MedPy users.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline.brats import EDITION_BY_NAME
from pipeline.metrics import evaluate_case
from pipeline.nifti import save_volume
from pipeline.transforms import map_labels
from tests.conftest import REPO

SCRIPT = Path(__file__).parent / "official" / "panoptica_scores.py"


def official_python() -> Path:
    path = Path(os.environ.get("BRATS_OFFICIAL_PYTHON", REPO / ".venv-official" / "bin" / "python"))
    if not path.is_file():
        pytest.skip(f"the official BraTS evaluation package is not installed ({path}): make setup-official")
    res = subprocess.run([str(path), "-c", "import brats_evaluation, panoptica"], capture_output=True, text=True,
                         timeout=300)
    if res.returncode != 0:
        pytest.skip(f"{path} cannot import brats_evaluation: {res.stderr.strip()[-300:]}")
    return path


def tumour(shape: tuple[int, int, int], centre: tuple[int, int, int], r: tuple[int, int, int]) -> np.ndarray:
    """A label map (BraTS 2023 labels: 1 necrosis, 2 oedema, 3 ET) of nested boxes of half-sizes ``r``."""
    out = np.zeros(shape, np.uint8)
    for label, scale in ((2, 1.0), (1, 0.6), (3, 0.3)):
        box = tuple(slice(c - max(int(h * scale), 1), c + max(int(h * scale), 1) + 1) for c, h in zip(centre, r))
        out[box] = label
    return out


def cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(prediction, reference) pairs, each pinning a rule."""
    shape = (48, 48, 40)
    ref = tumour(shape, (20, 20, 18), (8, 7, 6))
    sat = ref.copy()
    sat[38:41, 38:41, 30:33] = 3  # an enhancing satellite far from the tumour
    out = {
        "perfect": (ref, ref),
        "shifted by 2 voxels": (np.roll(ref, 2, axis=0), ref),
        "grown and shrunk": (tumour(shape, (20, 21, 18), (9, 6, 6)), ref),
        "missed satellite": (ref, sat),
        "false-positive satellite": (sat, ref),
    }
    bridge = ref.copy()
    bridge[20:36, 19:22, 17:20] = 2  # oedema bridging to a second lesion
    bridge[34:40, 16:24, 14:22] = 2
    out["bridging component"] = (bridge, ref)
    no_et = np.where(ref == 3, 1, ref).astype(np.uint8)
    out["no predicted ET"] = (no_et, ref)
    return out


def score_official(python: Path, tmp: Path, pairs: dict[str, tuple[np.ndarray, np.ndarray]],
                   spacing: tuple[float, float, float]) -> dict[str, dict[str, dict[str, float | None]]]:
    affine = np.diag([*spacing, 1.0])
    args = []
    for i, (pred, ref) in enumerate(pairs.values()):
        save_volume(tmp / f"pred{i}.nii.gz", pred, affine)
        save_volume(tmp / f"ref{i}.nii.gz", ref, affine)
        args += [str(tmp / f"pred{i}.nii.gz"), str(tmp / f"ref{i}.nii.gz")]
    res = subprocess.run([str(python), str(SCRIPT), *args], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return dict(zip(pairs, json.loads(res.stdout.strip().splitlines()[-1])))


def ours(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, float, float], method: str) -> dict[str, float]:
    label_map = EDITION_BY_NAME["brats2023"].label_map
    return evaluate_case(map_labels(pred, label_map), map_labels(ref, label_map), spacing, hd95_method=method)


def test_dice_and_hd95_match_the_official_package(tmp_path: Path) -> None:
    python = official_python()
    pairs = cases()
    official = score_official(python, tmp_path, pairs, (1.0, 1.0, 1.0))
    compared = 0
    for name, (pred, ref) in pairs.items():
        mine = ours(pred, ref, (1.0, 1.0, 1.0), "pooled")
        for region in ("WT", "TC", "ET"):
            theirs = official[name][region.lower()]
            assert theirs["dsc"] == pytest.approx(mine[f"Dice_{region}"], abs=1e-3), (name, region)
            if not (pred_empty := not np.isin(pred, (1, 2, 3) if region == "WT" else (1, 3) if region == "TC"
                                              else (3,)).any()):
                assert theirs["hd95"] == pytest.approx(mine[f"HD95_{region}"], abs=0.1), (name, region)
                compared += 1
            else:  # one mask empty: the package gives no finite distance; we give MedPy's 373.13
                assert pred_empty and theirs["hd95"] is None and mine[f"HD95_{region}"] == pytest.approx(373.13)
    assert compared >= 18  # every non-empty pair of every case and region
    differs = [n for n, (p, r) in pairs.items() if abs(ours(p, r, (1.0, 1.0, 1.0), "brats")["HD95_ET"]
                                                       - ours(p, r, (1.0, 1.0, 1.0), "pooled")["HD95_ET"]) > 0.1]
    assert differs, "no case tells the 2023 definition from the pooled one"


def test_the_official_package_measures_hd95_in_voxels(tmp_path: Path) -> None:
    python = official_python()
    pairs = {k: v for k, v in cases().items() if k in ("shifted by 2 voxels", "missed satellite")}
    official = score_official(python, tmp_path, pairs, (1.0, 1.0, 2.0))
    for name, (pred, ref) in pairs.items():
        voxels, mm = ours(pred, ref, (1.0, 1.0, 1.0), "pooled"), ours(pred, ref, (1.0, 1.0, 2.0), "pooled")
        assert official[name]["tc"]["hd95"] == pytest.approx(voxels["HD95_TC"], abs=0.1), name
        assert official[name]["tc"]["dsc"] == pytest.approx(mm["Dice_TC"], abs=1e-3)
    name = "missed satellite"
    pred, ref = pairs[name]
    assert abs(ours(pred, ref, (1.0, 1.0, 2.0), "pooled")["HD95_ET"] - official[name]["et"]["hd95"]) > 1.0
