"""Pictures for TensorBoard: a FLAIR slice with ground truth and prediction overlaid."""

from __future__ import annotations

import numpy as np

#: RGB per class: necrosis red, oedema green, enhancing tumour yellow, resection cavity blue.
COLOURS = np.array([[0, 0, 0], [230, 40, 40], [40, 200, 60], [250, 220, 30], [60, 120, 250]], dtype=np.float32)


def _panel(gray: np.ndarray, label: np.ndarray, alpha: float) -> np.ndarray:
    rgb = np.repeat(gray[..., None], 3, axis=2)
    colour = COLOURS[np.clip(label, 0, len(COLOURS) - 1)]
    mask = (label > 0)[..., None]
    return np.where(mask, (1 - alpha) * rgb + alpha * colour, rgb)


def overlay_slice(flair: np.ndarray, truth: np.ndarray, pred: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Side-by-side axial slice: FLAIR + ground truth | FLAIR + prediction.

    The slice is the one with the most ground-truth tumour (the middle one if
    there is none).

    Args:
        flair: (X, Y, Z) float, z-scored.
        truth: (X, Y, Z) classes 0..3.
        pred: (X, Y, Z) classes 0..3.

    Returns:
        (Y, 2 * X + 2, 3) uint8, image rows along Y.
    """
    area = (truth > 0).sum(axis=(0, 1))
    z = int(area.argmax()) if area.max() > 0 else flair.shape[2] // 2
    sl = flair[:, :, z]
    lo, hi = np.percentile(sl, [1, 99]) if sl.any() else (0.0, 1.0)
    gray = np.clip((sl - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    left = _panel(gray, truth[:, :, z], alpha)
    right = _panel(gray, pred[:, :, z], alpha)
    gap = np.full((2, gray.shape[1], 3), 255.0)
    out = np.concatenate([left, gap, right], axis=0)
    return np.ascontiguousarray(out.transpose(1, 0, 2)).astype(np.uint8)
