"""The results report: one self-contained page, every case worst first with its scores and its montage."""

from __future__ import annotations

import base64
import csv
import io
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from pipeline.nifti import BRATS_AFFINE, save_volume
from preprocess.run import run_preprocess
from tests.conftest import REPO, TINY_CFG, load
from tests.test_evaluate import IDS, copy_gt_as_predictions
from tests.test_predict import CPU, tiny_checkpoint
from train.evaluate import evaluate_run, main
from train.report import FALSE_POSITIVE, MISSED, ROWS, TINT


class Page(HTMLParser):
    """What the tests read of a page: case sections in order, pictures, links and loads."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: dict[str, list[str]] = {}
        self.urls: list[str] = []
        self.text: list[str] = []
        self.svg = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section" and a.get("class") == "case":
            self.sections.append(str(a["id"]))
            self.images[str(a["id"])] = []
        if tag == "img" and self.sections:
            self.images[self.sections[-1]].append(str(a["src"]))
        if tag == "svg":
            self.svg += 1
        self.urls += [str(v) for k, v in attrs if k in ("src", "href")]

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def read_page(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def png_of(src: str) -> np.ndarray:
    assert src.startswith("data:image/png;base64,")
    data = base64.b64decode(src.split(",", 1)[1])
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(io.BytesIO(data), format="png")[..., :3]


def tinted(picture: np.ndarray, colour: tuple[int, int, int]) -> int:
    """Pixels that carry ``colour``'s tint: far more of its strongest channel than of its weakest."""
    c = np.array(colour) / 255
    strong, weak = int(c.argmax()), int(c.argmin())
    return int(((picture[..., strong] - picture[..., weak]) > TINT * 0.9).sum())


def imperfect_predictions(raw_dir: Path, pred: Path) -> None:
    """IDS[0] perfect, IDS[1] misses its enhancing tumour, IDS[2] puts its tumour beside the true one."""
    copy_gt_as_predictions(raw_dir, pred)
    seg = load(raw_dir / IDS[1] / f"{IDS[1]}_seg.nii.gz")
    save_volume(pred / f"{IDS[1]}.nii.gz", np.where(seg == 4, 1, seg).astype(np.uint8), BRATS_AFFINE)
    seg = load(raw_dir / IDS[2] / f"{IDS[2]}_seg.nii.gz")
    xs = np.flatnonzero((seg > 0).any(axis=(1, 2)))
    wrong = np.roll(seg, -(int(xs[-1] - xs[0]) + 2), axis=0).astype(np.uint8)  # disjoint from the true one
    save_volume(pred / f"{IDS[2]}.nii.gz", wrong, BRATS_AFFINE)


def test_report_is_one_offline_page_with_every_case_worst_first(raw_dir: Path, tmp_path: Path) -> None:
    pred, out = tmp_path / "pred", tmp_path / "out"
    imperfect_predictions(raw_dir, pred)
    shutil.copytree(raw_dir / IDS[0], raw_dir / "BraTS20_Training_009")  # a case without a prediction
    for f in (raw_dir / "BraTS20_Training_009").iterdir():
        f.rename(f.with_name(f.name.replace(IDS[0], "BraTS20_Training_009")))
    assert main(["--pred", str(pred), "--gt", str(raw_dir), "--out", str(out), "--report", "--no-progress"]) == 1

    page = read_page(out / "report.html")
    with (out / "metrics.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if not r["error"]]
    mean = {r["case_id"]: np.mean([float(r[f"Dice_{g}"]) for g in ("WT", "TC", "ET")]) for r in rows}
    assert page.sections == sorted(mean, key=lambda c: mean[c]) == [IDS[2], IDS[1], IDS[0]]
    assert all(u.startswith(("data:image/png;base64,", "#")) for u in page.urls), "the page loads something"
    assert page.svg == 1  # the box plots
    text = " ".join(page.text)
    assert "Failed cases" in text and "no prediction BraTS20_Training_009.nii.gz" in text
    for cid in IDS:
        (src,) = page.images[cid]
        picture = png_of(src)
        height, width = load(raw_dir / cid / f"{cid}_flair.nii.gz").shape[1:3]
        assert picture.shape[0] >= len(ROWS) * min(height, width) // 2 and picture.shape[1] > picture.shape[0] // 2
    perfect, no_et, missed = (png_of(page.images[c][0]) for c in IDS)
    assert tinted(perfect, MISSED) == tinted(perfect, FALSE_POSITIVE) == 0
    assert tinted(no_et, MISSED) > 0 and tinted(no_et, FALSE_POSITIVE) == 0
    assert tinted(missed, MISSED) > tinted(no_et, MISSED) and tinted(missed, FALSE_POSITIVE) > 0


def test_a_case_without_its_images_keeps_its_scores_and_says_why_it_has_no_montage(raw_dir: Path,
                                                                                   tmp_path: Path) -> None:
    pred, out = tmp_path / "pred", tmp_path / "out"
    copy_gt_as_predictions(raw_dir, pred)
    (raw_dir / IDS[1] / f"{IDS[1]}_t1ce.nii.gz").unlink()
    assert main(["--pred", str(pred), "--gt", str(raw_dir), "--out", str(out), "--report", "--no-progress"]) == 0
    page = read_page(out / "report.html")
    assert sorted(page.sections) == IDS and page.images[IDS[1]] == [] and len(page.images[IDS[0]]) == 1
    assert f"no montage: {IDS[1]}" in " ".join(page.text) and "no t1ce image" in " ".join(page.text)


def test_a_run_reports_its_validation_cases_on_the_cached_images(raw_dir: Path, tmp_path: Path) -> None:
    cache = run_preprocess(raw_dir, tmp_path / "cache", TINY_CFG, jobs=1, progress=False).cache_dir
    run = tmp_path / "run"
    tiny_checkpoint(run / "best.pt", cache_dir=str(cache), val=IDS[1:])
    evaluate_run(run, CPU, progress=False, report=True)
    page = read_page(run / "evaluation" / "report.html")
    assert sorted(page.sections) == IDS[1:] and all(len(page.images[c]) == 1 for c in IDS[1:])
    assert png_of(page.images[IDS[1]][0]).std() > 0.05  # an image, not a blank


def test_without_report_there_is_no_page(raw_dir: Path, tmp_path: Path) -> None:
    pred = tmp_path / "pred"
    copy_gt_as_predictions(raw_dir, pred)
    assert main(["--pred", str(pred), "--gt", str(raw_dir), "--no-progress"]) == 0
    assert not (pred / "report.html").exists() and (pred / "summary.json").is_file()


def test_the_page_renders_in_headless_chromium(raw_dir: Path, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (apt-get install chromium): the page's structure is tested above")
    pred, out = tmp_path / "pred", tmp_path / "out"
    imperfect_predictions(raw_dir, pred)
    assert main(["--pred", str(pred), "--gt", str(raw_dir), "--out", str(out), "--report", "--no-progress"]) == 0
    res = subprocess.run([sys.executable, str(REPO / "docs" / "screenshot_report.py"), str(out / "report.html"),
                          str(tmp_path / "shot.png"), "--width", "900", "--height", "1400"],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    shot = imread(tmp_path / "shot.png")[..., :3]
    assert shot.shape[:2] == (1400, 900) and shot.std() > 0.05  # a rendered page, not a blank one
