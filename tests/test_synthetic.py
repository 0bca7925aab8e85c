"""Tests of the synthetic BraTS2020-style data generator (small shapes, fast)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from pipeline.brats import MODALITIES
from pipeline.errors import ConfigError
from pipeline.nifti import BRATS_AFFINE, discover_cases, read_case
from pipeline.synthetic import generate_dataset, main, make_case

REPO = Path(__file__).resolve().parents[1]
SHAPE = (48, 56, 40)
NAMES = (*MODALITIES, "seg")
CUBE = np.ones((3, 3, 3), dtype=bool)


def _read(folder: Path, name: str, suffix: str = ".nii") -> np.ndarray:
    """Load one file of a case folder as a numpy array (on-disk dtype)."""
    img = nib.load(folder / f"{folder.name}_{name}{suffix}")
    assert np.allclose(img.affine, BRATS_AFFINE)
    return np.asanyarray(img.dataobj)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two .nii cases written with seed 0."""
    return generate_dataset(tmp_path_factory.mktemp("raw"), 2, shape=SHAPE)


@pytest.mark.parametrize("gz", [False, True])
def test_layout_matches_brats2020(tmp_path: Path, gz: bool) -> None:
    folders = generate_dataset(tmp_path, 2, shape=SHAPE, gz=gz, start=9)
    suffix = ".nii.gz" if gz else ".nii"
    assert [f.name for f in folders] == ["BraTS20_Training_009", "BraTS20_Training_010"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f.name for f in folders]
    for folder in folders:
        assert folder.parent == tmp_path
        assert sorted(p.name for p in folder.iterdir()) == sorted(f"{folder.name}_{n}{suffix}" for n in NAMES)
        assert _read(folder, "flair", suffix).shape == SHAPE


def test_dtypes_mask_and_labels(dataset: list[Path]) -> None:
    for folder in dataset:
        images = [_read(folder, m) for m in MODALITIES]
        seg = _read(folder, "seg")
        assert all(x.dtype == np.int16 for x in images) and seg.dtype == np.uint8
        brain = images[0] != 0
        for x in images:
            assert np.array_equal(x != 0, brain)  # one shared mask, background exactly 0
            assert x.min() == 0 and x[brain].min() >= 1
        assert set(np.unique(seg).tolist()) <= {0, 1, 2, 4}
        assert not np.any(seg[~brain])  # tumour inside the brain
    assert set(np.unique(_read(dataset[0], "seg")).tolist()) == {0, 1, 2, 4}


def test_brain_size_is_proportional_to_shape() -> None:
    images, _ = make_case(SHAPE, np.random.default_rng(3))
    extent = [int(np.ptp(a)) + 1 for a in np.nonzero(images["t1"])]
    expected = np.array([140, 170, 140]) * np.array(SHAPE) / np.array([240, 240, 155])
    assert np.all(np.abs(np.array(extent) - expected) <= 0.2 * expected + 2), extent


@pytest.mark.parametrize(("shape", "seeds", "margin"), [(SHAPE, (1, 3, 5), 1), ((128, 128, 84), (3,), 2)])
def test_necrosis_is_enclosed_by_enhancing_tumour(
    shape: tuple[int, int, int], seeds: tuple[int, ...], margin: int
) -> None:
    # From about half the BraTS size up, the enhancing rim is at least 2 voxels thick.
    for k in seeds:
        _, seg = make_case(shape, np.random.default_rng([0, k]))
        assert np.any(seg == 1)
        near_necrosis = ndimage.binary_dilation(seg == 1, CUBE, iterations=margin)
        assert not np.any(near_necrosis & (seg != 1) & (seg != 4))


def test_contrasts_hold_on_average() -> None:
    regions: dict[str, list[np.ndarray]] = {k: [] for k in ("normal", "oedema", "tumour", "enh", "nec")}
    values: dict[str, list[np.ndarray]] = {m: [] for m in MODALITIES}
    for k in range(4):
        images, seg = make_case(SHAPE, np.random.default_rng([0, k + 1]))
        for m in MODALITIES:  # each case on its own scale: divide by its brain mean
            values[m].append(images[m].astype(np.float64) / images[m][images[m] > 0].mean())
        masks = ((images["t1"] > 0) & (seg == 0), seg == 2, seg > 0, seg == 4, seg == 1)
        for key, mask in zip(regions, masks):
            regions[key].append(mask)

    def mean(modality: str, region: str) -> float:
        return float(np.concatenate([v[r] for v, r in zip(values[modality], regions[region])]).mean())

    assert mean("flair", "oedema") > 1.15 * mean("flair", "normal")
    assert mean("t2", "oedema") > mean("t2", "normal")
    assert mean("t1ce", "enh") > 1.5 * mean("t1ce", "nec")
    assert mean("t1", "tumour") < mean("t1", "normal")
    assert mean("t2", "nec") > mean("t2", "normal")


def test_intensity_scale_varies_between_cases_and_modalities(dataset: list[Path]) -> None:
    maxima = [int(_read(folder, m).max()) for folder in dataset for m in MODALITIES]
    assert all(500 <= m <= 16000 for m in maxima) and max(maxima) > 2 * min(maxima)


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = generate_dataset(tmp_path / "a", 1, seed=5, shape=SHAPE)[0]
    b = generate_dataset(tmp_path / "b", 1, seed=5, shape=SHAPE)[0]
    c = generate_dataset(tmp_path / "c", 1, seed=6, shape=SHAPE)[0]
    for n in NAMES:
        name = f"{a.name}_{n}.nii"
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert (a / name).read_bytes() != (c / name).read_bytes()


def test_case_does_not_depend_on_other_cases(tmp_path: Path, dataset: list[Path]) -> None:
    alone = generate_dataset(tmp_path, 1, start=2, shape=SHAPE)[0]
    assert alone.name == dataset[1].name
    for n in NAMES:
        assert (alone / f"{alone.name}_{n}.nii").read_bytes() == (dataset[1] / f"{alone.name}_{n}.nii").read_bytes()


def test_no_seg_and_prefix(tmp_path: Path) -> None:
    (folder,) = generate_dataset(tmp_path, 1, shape=SHAPE, with_seg=False, prefix="BraTS20_Validation")
    assert folder.name == "BraTS20_Validation_001"
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{folder.name}_{m}.nii" for m in MODALITIES)


def test_reader_accepts_generated_cases(dataset: list[Path]) -> None:
    cases = discover_cases(dataset[0].parent)
    assert [c.case_id for c in cases] == [f.name for f in dataset]
    raw = read_case(cases[0])
    assert raw.images.shape == (4, *SHAPE) and raw.seg is not None and raw.spacing == (1.0, 1.0, 1.0)


@pytest.mark.parametrize(
    "kwargs",
    [{"n_cases": 0}, {"seed": -1}, {"shape": (8, 56, 40)}, {"shape": (48, 56)}, {"start": 0}, {"prefix": "a/b"}],
)
def test_bad_arguments_raise_config_error(tmp_path: Path, kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"n_cases": 1, "shape": SHAPE, **kwargs}
    n_cases = args.pop("n_cases")
    with pytest.raises(ConfigError):
        generate_dataset(tmp_path, n_cases, **args)  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pipeline.synthetic", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)


def test_cli(tmp_path: Path) -> None:
    assert _cli("--help").returncode == 0
    done = _cli(str(tmp_path), "--cases", "2", "--shape", "24", "28", "20", "--gz", "--no-seg", "--start", "7")
    assert done.returncode == 0, done.stderr
    assert "BraTS20_Training_008" in done.stdout
    folder = tmp_path / "BraTS20_Training_008"
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{folder.name}_{m}.nii.gz" for m in MODALITIES)


def test_cli_rejects_bad_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path), "--cases", "1", "--shape", "24", "4", "20"])
    assert exc.value.code == 2 and "(24, 4, 20)" in capsys.readouterr().err
