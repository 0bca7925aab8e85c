"""What an evaluation writes: ``metrics.csv``, ``summary.json``, ``boxplot.png`` and the printed table
(:func:`write_reports`), and with ``--report`` the results page, one self-contained HTML file.

The page opens offline, from the file alone: its pictures are PNG and SVG
inside it, its style is inline, it loads nothing. It holds

* the summary (mean ± sd, median and quartiles per metric and region) and
  box plots of Dice and HD95 per region;
* the cases that failed, with their errors;
* every evaluated case from the worst to the best (by its mean Dice over
  WT, TC and ET), each with its per-region and lesion-wise scores and a
  montage: FLAIR with the whole tumour, T1ce with the tumour core, T1ce
  with the enhancing tumour, each in the axial, coronal and sagittal plane
  through the centre of the tumour (reference and prediction together);
  the reference's outline green, the prediction's yellow, missed voxels
  cyan, false-positive voxels magenta.

:func:`montage` draws a case's picture while its label maps are in memory;
:func:`write_report` writes the page.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imsave
from scipy import ndimage

from pipeline.atomic import atomic_path, remove_leftovers
from pipeline.brats import GLIOMA_RC, REGIONS, region_masks
from pipeline.cache.location import redact_tree
from pipeline.metrics import summarise
from pipeline.provenance import run_record

#: The montage's rows: (modality, region shown on it).
ROWS: tuple[tuple[str, str], ...] = (("flair", "WT"), ("t1ce", "TC"), ("t1ce", "ET"))
#: RGB of the marks.
REFERENCE, PREDICTION = (40, 220, 60), (255, 220, 0)
MISSED, FALSE_POSITIVE = (0, 200, 255), (255, 0, 200)
#: Opacity of the missed / false-positive tint.
TINT = 0.45
#: Metrics shown per region in a case's table, and in the summary (those present).
CASE_METRICS = ("Dice", "HD95", "Sensitivity", "Specificity", "Volume_gt", "Volume_pred",
                "LesionDice", "LesionHD95")


def case_mean_dice(row: dict[str, Any]) -> float:
    """Mean Dice over WT, TC and ET: the order of the report's cases."""
    return float(np.mean([float(row[f"Dice_{r}"]) for r in REGIONS]))


def _centre(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, int]:
    """The centre of the tumour's bounding box (reference and prediction), else of the volume."""
    found = np.argwhere((pred > 0) | (gt > 0))
    if not len(found):
        return pred.shape[0] // 2, pred.shape[1] // 2, pred.shape[2] // 2
    return tuple(int(v) for v in (found.min(axis=0) + found.max(axis=0)) // 2)  # type: ignore[return-value]


def _planes(volume: np.ndarray, centre: tuple[int, int, int]) -> list[np.ndarray]:
    """Axial, coronal and sagittal slices through ``centre``, oriented for display (superior / anterior up)."""
    x, y, z = centre
    return [volume[:, :, z].T[::-1], volume[:, y, :].T[::-1], volume[x, :, :].T[::-1]]


def _gray(image: np.ndarray) -> np.ndarray:
    """A slice as float RGB in [0, 1], windowed on the 1st-99th percentile of its brain voxels."""
    brain = image[image != 0]
    lo, hi = np.percentile(brain, [1, 99]) if brain.size else (0.0, 1.0)
    gray = np.where(image != 0, np.clip((image - lo) / max(float(hi - lo), 1e-6), 0, 1), 0.0)  # outside: black
    rgb: np.ndarray = np.repeat(gray[..., None], 3, axis=2)
    return rgb


def _outline(mask: np.ndarray) -> np.ndarray:
    edge: np.ndarray = mask & ~ndimage.binary_erosion(mask)
    return edge


def _panel(image: np.ndarray, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """One slice: gray image, errors tinted, outlines drawn; float RGB."""
    rgb = _gray(image)
    for mask, colour in ((gt & ~pred, MISSED), (pred & ~gt, FALSE_POSITIVE)):
        rgb[mask] = (1 - TINT) * rgb[mask] + TINT * np.array(colour) / 255
    for mask, colour in ((gt, REFERENCE), (pred, PREDICTION)):
        rgb[_outline(mask)] = np.array(colour) / 255
    return rgb


def _brain_box(image: np.ndarray, *masks: np.ndarray) -> tuple[slice, slice]:
    """The bounding box of a slice's non-zero voxels and ``masks`` (the whole slice if none), 2 voxels of
    margin: a false positive outside the brain stays in the picture."""
    found = np.argwhere(np.logical_or.reduce([image != 0, *masks]))
    if not len(found):
        return slice(None), slice(None)
    lo, hi = np.maximum(found.min(axis=0) - 2, 0), found.max(axis=0) + 3
    return slice(int(lo[0]), int(hi[0])), slice(int(lo[1]), int(hi[1]))


def montage(images: dict[str, np.ndarray], pred: np.ndarray, gt: np.ndarray) -> bytes:
    """A case's picture as PNG bytes: :data:`ROWS` by the three planes through the tumour's centre.

    Args:
        images: (X, Y, Z) float volumes by modality name; needs those :data:`ROWS` name.
        pred: (X, Y, Z) predicted classes 0..3.
        gt: (X, Y, Z) reference classes 0..3, on the same grid.

    Raises:
        KeyError: a modality of :data:`ROWS` is not in ``images``.
        ValueError: the volumes are not all on one grid.
    """
    shapes = {a.shape for a in (*images.values(), pred, gt)}
    if len(shapes) != 1:
        raise ValueError(f"the montage's volumes lie on different grids: {sorted(shapes)}")
    centre = _centre(pred, gt)
    pred_regions, gt_regions = region_masks(pred), region_masks(gt)
    rows = []
    for modality, region in ROWS:
        panels = []
        for image, p, g in zip(_planes(images[modality], centre), _planes(pred_regions[region], centre),
                               _planes(gt_regions[region], centre)):
            box = _brain_box(image, p, g)
            panels.append(_panel(image[box], p[box], g[box]))
        height = max(p.shape[0] for p in panels)
        padded = [np.pad(p, ((0, height - p.shape[0]), (0, 4), (0, 0)), constant_values=1.0) for p in panels]
        rows.append(np.concatenate(padded, axis=1))
    width = max(r.shape[1] for r in rows)
    picture = np.concatenate([np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=1.0)
                              for r in rows], axis=0)
    buffer = io.BytesIO()
    imsave(buffer, np.clip(picture, 0, 1), format="png")
    return buffer.getvalue()


def centre_caption(pred: np.ndarray, gt: np.ndarray) -> str:
    """Where a case's montage cuts the volume."""
    x, y, z = _centre(pred, gt)
    return f"axial z = {z}, coronal y = {y}, sagittal x = {x}"


@dataclass(frozen=True)
class CaseView:
    """What the report shows of one evaluated case beside its scores: its montage, or why there is none."""

    png: bytes | None
    caption: str


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float | np.floating):
        v = float(value)
        return "–" if math.isnan(v) else f"{v:.{digits}f}"
    return html.escape(str(value))


def _boxplot_svg(rows: Sequence[dict[str, Any]]) -> str:
    """Dice and HD95 per region as box plots, inline SVG."""
    fig = boxplot_figure(rows)
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    svg = buffer.getvalue()
    return svg[svg.index("<svg"):]


def scored_regions(keys: Iterable[str]) -> list[str]:
    """The regions whose ``Dice_<region>`` is among ``keys``: WT, TC, ET, and RC where cases have the cavity."""
    present = set(keys)
    return [r for r in GLIOMA_RC.regions if f"Dice_{r}" in present]


def boxplot_figure(rows: Sequence[dict[str, Any]]) -> Figure:
    """Two panels: Dice per region and HD95 (mm) per region, one box per region (means marked)."""
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, metric, unit in zip(fig.subplots(1, 2), ("Dice", "HD95"), ("", " (mm)")):
        regions = scored_regions(k for r in rows for k in r) or list(REGIONS)
        data = [[float(r[f"{metric}_{reg}"]) for r in rows if f"{metric}_{reg}" in r] for reg in regions]
        if rows:
            ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(regions) + 1), regions)
        ax.set_title(f"{metric} per region (n = {len(rows)})")
        ax.set_ylabel(metric + unit)
        ax.grid(axis="y", alpha=0.3)
    return fig


def _metric_names(rows: Sequence[dict[str, Any]]) -> list[str]:
    present = {k for row in rows for k in row}
    return [m for m in CASE_METRICS if any(k.startswith(f"{m}_") for k in present)]


def _region_key(metric: str, region: str, row: dict[str, Any]) -> str | None:
    for key in (f"{metric}_{region}", f"{metric}_{region}_ml"):
        if key in row:
            return key
    return None


def _summary_table(summary: dict[str, Any], metrics: list[str]) -> str:
    stats = summary["metrics"]
    head = "".join(f"<th>{html.escape(m)}</th>" for m in metrics)
    body = []
    for reg in scored_regions(stats) or REGIONS:
        cells = []
        for m in metrics:
            s = stats.get(f"{m}_{reg}") or stats.get(f"{m}_{reg}_ml")
            cells.append(f"<td>{_fmt(s['mean'])} ± {_fmt(s['std'])}<br><small>median {_fmt(s['median'])} "
                         f"[{_fmt(s['p25'])}, {_fmt(s['p75'])}]</small></td>" if s else "<td>–</td>")
        body.append(f"<tr><th>{reg}</th>{''.join(cells)}</tr>")
    return f"<table class=summary><tr><th>region</th>{head}</tr>{''.join(body)}</table>"


def _case_table(row: dict[str, Any], metrics: list[str]) -> str:
    head = "".join(f"<th>{html.escape(m)}</th>" for m in metrics)
    body = []
    for reg in scored_regions(row) or REGIONS:
        cells = "".join(f"<td>{_fmt(row[k]) if (k := _region_key(m, reg, row)) else '–'}</td>" for m in metrics)
        body.append(f"<tr><th>{reg}</th>{cells}</tr>")
    return f"<table class=case><tr><th>region</th>{head}</tr>{''.join(body)}</table>"


STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}small{color:#666}section.case{border-top:2px solid #ddd;margin-top:1.5em}
.legend span{display:inline-block;width:1em;height:1em;vertical-align:middle;margin:0 .3em 0 1em}
img.montage{max-width:100%;image-rendering:pixelated}.failed{color:#a00}nav a{margin-right:.8em}
"""


def _legend() -> str:
    items = ((REFERENCE, "reference outline"), (PREDICTION, "prediction outline"), (MISSED, "missed"),
             (FALSE_POSITIVE, "false positive"))
    spans = "".join(f"<span style='background:rgb{c}'></span>{t}" for c, t in items)
    rows = "; ".join(f"{m.upper() if m == 'flair' else 'T1ce'} with {r}" for m, r in ROWS)
    return f"<p class=legend>Montage rows: {rows}. Columns: axial, coronal, sagittal.{spans}</p>"


#: The metrics of the printed table, and the lesion-wise ones shown when present.
TABLE_METRICS = ("Dice", "HD95", "Sensitivity", "Specificity")
LESION_METRICS = ("LesionDice", "LesionHD95")


def write_csv(path: Path, rows: list[dict[str, Any]], failed: dict[str, str]) -> None:
    """One row per case, sorted by id: metrics, or an ``error`` and empty metrics."""
    keys = list(dict.fromkeys(k for row in rows for k in row if k != "case_id"))
    table = [*rows, *({"case_id": cid, "error": msg} for cid, msg in failed.items())]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["case_id", *keys, "error"], restval="")
        writer.writeheader()
        writer.writerows(sorted(table, key=lambda r: str(r["case_id"])))


def write_boxplot(path: Path, rows: list[dict[str, Any]]) -> None:
    """Two panels: Dice per region and HD95 (mm) per region, one box per region."""
    with atomic_path(path, ".png") as tmp:
        boxplot_figure(rows).savefig(tmp, dpi=120)


def format_table(summary: dict[str, Any]) -> str:
    """Mean ± std per region of Dice, HD95, sensitivity and specificity."""
    stats = summary["metrics"]
    shown = TABLE_METRICS + tuple(m for m in LESION_METRICS if f"{m}_WT" in stats)
    lines = [f"{'region':<8}" + "".join(f"{m:^21}" for m in shown)]
    for reg in scored_regions(stats) or REGIONS:
        cells = []
        for m in shown:
            s = stats.get(f"{m}_{reg}")
            cells.append(f"{s['mean']:>11.4f} ± {s['std']:<7.3f}" if s else f"{'-':^21}")
        lines.append(f"{reg:<8}" + "".join(cells))
    lines.append(f"cases evaluated {summary['n_cases']}, failed {summary['n_failed']}")
    return "\n".join(lines)


def write_reports(out_dir: Path, rows: list[dict[str, Any]], failed: dict[str, str],
                  extra: dict[str, Any], views: dict[str, CaseView] | None = None) -> dict[str, Any]:
    """Write ``metrics.csv``, ``summary.json`` and ``boxplot.png`` (and with ``views``, ``report.html``);
    return the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out_dir)
    metrics = summarise([{k: v for k, v in r.items() if not isinstance(v, str)} for r in rows])  # not ids, names
    summary = {
        "n_cases": len(rows), "n_failed": len(failed), "failed": dict(sorted(failed.items())),
        "metrics": metrics, **extra, "record": run_record(),
    }
    write_csv(out_dir / "metrics.csv", rows, failed)
    summary = dict(redact_tree(summary))
    with atomic_path(out_dir / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    write_boxplot(out_dir / "boxplot.png", rows)
    if views is not None:
        write_report(out_dir / "report.html", summary, rows, views)
    return summary


def write_report(path: Path, summary: dict[str, Any], rows: Sequence[dict[str, Any]],
                 views: dict[str, CaseView], title: str = "BraTS evaluation") -> None:
    """Write the self-contained page (atomically: a crash leaves no half-written ``report.html``).

    Args:
        path: the page's file.
        summary: what ``summary.json`` holds (``metrics``, ``failed``, ``n_cases`` and the settings).
        rows: one metrics row per evaluated case (``case_id`` first).
        views: the montage of each case, by id.
    """
    metrics = _metric_names(rows)
    ordered = sorted(rows, key=lambda r: (case_mean_dice(r), str(r["case_id"])))
    settings = {k: v for k, v in summary.items() if k not in ("metrics", "failed", "record", "n_cases", "n_failed")}
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{summary['n_cases']} cases evaluated, {summary['n_failed']} failed. HD95 in mm; volumes in ml.</p>",
        "<table class=settings>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>"
                                          for k, v in settings.items()) + "</table>",
        "<h2>Summary</h2>", _summary_table(summary, metrics), f"<div class=boxplot>{_boxplot_svg(rows)}</div>",
    ]
    if summary["failed"]:
        parts.append("<h2 class=failed>Failed cases</h2><table class=failed>" + "".join(
            f"<tr><th>{html.escape(str(c))}</th><td>{html.escape(str(m))}</td></tr>"
            for c, m in summary["failed"].items()) + "</table>")
    parts.append("<h2>Cases, worst first</h2>" + _legend() + "<nav>" + "".join(
        f"<a href='#{html.escape(str(r['case_id']))}'>{html.escape(str(r['case_id']))}</a>" for r in ordered)
        + "</nav>")
    for rank, row in enumerate(ordered, 1):
        cid = html.escape(str(row["case_id"]))
        view = views.get(str(row["case_id"]))
        if view is not None and view.png is not None:
            data = base64.b64encode(view.png).decode("ascii")
            width = 2 * int.from_bytes(view.png[16:20], "big")  # twice the PNG's own width, pixels kept sharp
            picture = (f"<img class=montage width={width} alt='montage of {cid}' src='data:image/png;base64,{data}'>"
                       f"<p><small>{html.escape(view.caption)}</small></p>")
        else:
            picture = f"<p class=failed>no montage: {html.escape(view.caption if view else 'not drawn')}</p>"
        parts.append(f"<section class=case id='{cid}'><h3>{rank}. {cid} <small>mean Dice "
                     f"{_fmt(case_mean_dice(row))}</small></h3>{_case_table(row, metrics)}{picture}</section>")
    parts.append("</body></html>")
    with atomic_path(path, ".html") as tmp:
        tmp.write_text("\n".join(parts), encoding="utf-8")
