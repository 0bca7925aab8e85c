"""Segmentation losses: soft Dice + cross-entropy, over classes or BraTS regions.

Label convention (project-wide): 0 background, 1 necrosis (NCR), 2 oedema
(ED), 3 enhancing tumour (ET). Regions: WT = {1, 2, 3}, TC = {1, 3}, ET = {3}.

* ``mode="classes"``: softmax over 4 classes; Dice over classes 1..3
  (background excluded) + cross-entropy over all 4.
* ``mode="regions"``: sigmoid over 3 channels WT/TC/ET; Dice + BCE on each.

With the resection cavity (BraTS 2024, :data:`pipeline.brats.GLIOMA_RC`) class 4
is RC: 5 classes, or 4 regions WT/TC/ET/RC (``LossConfig.labels``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.brats import GLIOMA, LOSS_CHANNELS, NUM_CLASSES, SCHEMES, LabelScheme, scheme_named
from pipeline.config import Config
from pipeline.errors import ConfigError

MODES = tuple(LOSS_CHANNELS)


def num_outputs(mode: str, scheme: LabelScheme = GLIOMA) -> int:
    """Model output channels a loss mode needs: 4 for ``classes``, 3 for ``regions`` (5 and 4 with the
    resection cavity).

    Raises:
        ConfigError: unknown mode.
    """
    if mode in LOSS_CHANNELS:
        return scheme.channels(mode)
    raise ConfigError(f"loss mode must be one of {MODES}, got {mode!r}")


@dataclass(frozen=True)
class LossConfig(Config):
    """Settings of :class:`SegmentationLoss`; stored in every checkpoint.

    Attributes:
        mode: ``"classes"`` (softmax, Dice + CE) or ``"regions"`` (sigmoid
            WT/TC/ET, Dice + BCE).
        batch_dice: pool Dice statistics over the batch (one Dice per class
            for the whole batch) instead of averaging per-sample Dice. Less
            noisy when patches often lack a class.
        squared_dice: square the predicted probabilities in the Dice
            denominator (``2 tp / (sum p^2 + sum t)``, V-Net's form): a
            confident voxel costs as before, an unsure one less, so the
            gradient pushes less towards hedged, smeared-out predictions.
        smooth: added to Dice numerator and denominator; tiny, so that an
            empty prediction is not rewarded where the target is non-empty.
        dice_weight: weight of the Dice term.
        ce_weight: weight of the cross-entropy (or BCE) term.
        labels: the label scheme (:data:`pipeline.brats.SCHEMES`): ``"glioma"`` or ``"glioma-rc"``.
        region_weights: one weight per scored channel (regions WT/TC/ET, or
            classes NCR/ED/ET; with the resection cavity one more) in both
            the Dice mean and the (B)CE, normalised to mean 1 so the loss
            keeps its scale; the background class keeps weight 1 in the CE.
            Empty: all equal.
    """

    mode: str = "classes"
    batch_dice: bool = False
    squared_dice: bool = False
    smooth: float = 1e-5
    dice_weight: float = 1.0
    ce_weight: float = 1.0
    labels: str = GLIOMA.name
    region_weights: tuple[float, ...] = ()

    @property
    def scheme(self) -> LabelScheme:
        return SCHEMES[self.labels]

    @property
    def scored_channels(self) -> int:
        """Channels the Dice term scores: every region, or every class but the background."""
        return num_outputs(self.mode, self.scheme) - (self.mode == "classes")

    def __post_init__(self) -> None:
        num_outputs(self.mode)  # validates mode
        scheme_named(self.labels)
        for name in ("batch_dice", "squared_dice"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("smooth", "dice_weight", "ce_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
        if not isinstance(self.region_weights, (tuple, list)):
            raise ConfigError(f"region_weights must be a sequence of numbers, got {self.region_weights!r}")
        object.__setattr__(self, "region_weights", tuple(self.region_weights))
        if self.region_weights:
            bad = [w for w in self.region_weights
                   if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0]
            if bad or len(self.region_weights) != self.scored_channels:
                raise ConfigError(
                    f"region_weights must be {self.scored_channels} finite numbers > 0 (one per "
                    f"{'region' if self.mode == 'regions' else 'tumour class'} of loss mode {self.mode!r} with "
                    f"labels {self.labels!r}), got {self.region_weights!r}")
        if self.smooth <= 0:
            raise ConfigError(f"smooth must be > 0 (0 makes empty-vs-empty Dice 0/0), got {self.smooth!r}")
        if self.dice_weight < 0 or self.ce_weight < 0 or self.dice_weight + self.ce_weight == 0:
            raise ConfigError(
                f"weights must be >= 0 and not both 0, got dice_weight={self.dice_weight!r}, "
                f"ce_weight={self.ce_weight!r}"
            )



def _check_label(label: torch.Tensor, num_classes: int = NUM_CLASSES) -> None:
    """Raise ValueError unless ``label`` is (B, X, Y, Z) integer with values in [0, num_classes)."""
    bad_dtype = label.dtype.is_floating_point or label.dtype.is_complex or label.dtype == torch.bool
    if label.ndim != 4 or bad_dtype:
        raise ValueError(f"label must be an integer (B, X, Y, Z) tensor, got {label.dtype} {tuple(label.shape)}")
    lo, hi = torch.aminmax(label)
    if int(lo) < 0 or int(hi) >= num_classes:
        # Raw BraTS label 4 (ET) must have been mapped to 3 by preprocessing.
        raise ValueError(f"label values must lie in [0, {num_classes - 1}], got range [{int(lo)}, {int(hi)}]")


def _onehot(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    onehot = torch.zeros((label.shape[0], num_classes, *label.shape[1:]), device=label.device)
    return onehot.scatter_(1, label.long().unsqueeze(1), 1.0)


def _regions(label: torch.Tensor, scheme: LabelScheme = GLIOMA) -> torch.Tensor:
    masks = [torch.isin(label, torch.tensor(classes, device=label.device)) for classes in scheme.regions.values()]
    return torch.stack(masks, dim=1).float()


def labels_to_onehot(label: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """One-hot encode a label map.

    Args:
        label: (B, X, Y, Z) integer, values in ``0 .. num_classes - 1``.
        num_classes: number of classes.

    Returns:
        (B, num_classes, X, Y, Z) float32.

    Raises:
        ValueError: wrong shape/dtype, or a value outside the class range
            (e.g. raw BraTS label 4, which the cache maps to 3).
    """
    _check_label(label, num_classes)
    return _onehot(label, num_classes)


def labels_to_regions(label: torch.Tensor, scheme: LabelScheme = GLIOMA) -> torch.Tensor:
    """BraTS region masks WT, TC, ET (and RC) from a contiguous label map.

    Args:
        label: (B, X, Y, Z) integer, values in 0..3 (0..4 with the resection cavity).
        scheme: the label scheme.

    Returns:
        (B, R, X, Y, Z) float32; channel 0 WT = {1,2,3}, 1 TC = {1,3}, 2 ET = {3}, 3 RC = {4} where the
        scheme has it.

    Raises:
        ValueError: wrong shape/dtype or a value outside the scheme's classes.
    """
    _check_label(label, scheme.num_classes)
    return _regions(label, scheme)


def soft_dice_loss(
    probs: torch.Tensor, target_onehot: torch.Tensor, *, batch_dice: bool, smooth: float,
    weights: torch.Tensor | None = None, squared: bool = False,
) -> torch.Tensor:
    """1 - mean soft Dice over channels, nnU-Net style.

    Per channel, ``dc = (2 tp + smooth) / (2 tp + fp + fn + smooth)`` with
    soft counts. With a tiny ``smooth``, a channel absent from the target
    scores ~1 only if the prediction is ~empty there too, and ~0 (loss ~1)
    if anything is predicted; the denominator is clamped, so no NaN.
    Pass only the channels to score (e.g. ``probs[:, 1:]`` to exclude the
    background).

    Args:
        probs: (B, C, X, Y, Z) float in [0, 1].
        target_onehot: (B, C, X, Y, Z) float in {0, 1}, same shape.
        batch_dice: sum the counts over the batch too (one Dice per channel)
            instead of averaging the per-sample Dice.
        smooth: > 0.
        weights: (C,) float > 0, a weighted mean over the channels (None: equal).
        squared: the denominator sums the squared probabilities,
            ``(2 tp + smooth) / (sum p^2 + sum t + smooth)`` (the target is
            binary, so its square is itself).

    Returns:
        () float32 scalar in [0, 1].

    Raises:
        ValueError: shapes differ or are not 5-D.
    """
    if probs.shape != target_onehot.shape or probs.ndim != 5:
        raise ValueError(f"probs {tuple(probs.shape)} and target {tuple(target_onehot.shape)} must be equal 5-D shapes")
    axes = (0, 2, 3, 4) if batch_dice else (2, 3, 4)
    probs = probs.float()
    target = target_onehot.float()
    tp = (probs * target).sum(axes)
    # 2tp + fp + fn == sum(probs) + sum(target)
    denom = (probs.square() if squared else probs).sum(axes) + target.sum(axes)
    dc = (2 * tp + smooth) / torch.clamp(denom + smooth, min=1e-8)
    if weights is None:
        return 1.0 - dc.mean()
    return 1.0 - (dc * weights).sum(-1).mean() / weights.sum()


def _downsample_label(label: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour (strided, centred like 'nearest-exact') label downsampling."""
    strides = [full // small for full, small in zip(label.shape[1:], shape)]
    if any(s < 1 or s * n != full for s, n, full in zip(strides, shape, label.shape[1:])):
        raise ValueError(f"output size {tuple(shape)} does not divide label size {tuple(label.shape[1:])}")
    sx, sy, sz = strides
    return label[:, sx // 2 :: sx, sy // 2 :: sy, sz // 2 :: sz]


class SegmentationLoss(nn.Module):
    """Dice + (B)CE, with nnU-Net-style deep supervision.

    Given a list of logits ``[full, 1/2, 1/4, ...]`` the per-scale losses are
    weighted 1, 1/2, 1/4, ... normalised to sum 1, each against the label
    downsampled by strided (nearest) sampling.
    """

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.scheme = cfg.scheme
        self.channels = num_outputs(cfg.mode, self.scheme)
        weights = torch.tensor(cfg.region_weights, dtype=torch.float32)
        self.weights: torch.Tensor | None = weights / weights.mean() if cfg.region_weights else None

    def forward(self, logits: torch.Tensor | Sequence[torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        """Loss of one batch.

        Args:
            logits: (B, C, X, Y, Z) float, C = ``num_outputs(mode)``; or a
                list of such tensors at scales 1, 1/2, 1/4, ...
            label: (B, X, Y, Z) integer, values 0..3, at full resolution.

        Returns:
            () float32 scalar.

        Raises:
            ConfigError: logits channel count does not match the mode.
            ValueError: bad label, or spatial shapes that do not match.
        """
        outputs = [logits] if isinstance(logits, torch.Tensor) else list(logits)
        if not outputs:
            raise ValueError("logits is an empty list")
        full = outputs[0]
        if full.ndim != 5 or full.shape[0] != label.shape[0] or full.shape[2:] != label.shape[1:]:
            raise ValueError(f"logits {tuple(full.shape)} do not match label {tuple(label.shape)}")
        _check_label(label, self.scheme.num_classes)  # once, not per scale: it syncs with the device
        weights = [0.5**k for k in range(len(outputs))]
        total = sum(weights)
        loss = full.new_zeros((), dtype=torch.float32)
        for w, out in zip(weights, outputs):
            if out.ndim != 5 or out.shape[1] != self.channels:
                raise ConfigError(
                    f"loss mode {self.cfg.mode!r} needs {self.channels} output channels, got logits {tuple(out.shape)}"
                )
            target = _downsample_label(label, out.shape[2:])
            loss = loss + (w / total) * self._single(out.float(), target.long())
        return loss

    def _single(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Dice + CE at one scale; logits (B, C, X, Y, Z) float32, label (B, X, Y, Z) int64."""
        cfg = self.cfg
        w = None if self.weights is None else self.weights.to(logits.device)
        if cfg.mode == "classes":
            probs = torch.softmax(logits, dim=1)[:, 1:]
            target = _onehot(label, self.scheme.num_classes)[:, 1:]
            ce = F.cross_entropy(logits, label, weight=None if w is None else torch.cat([w.new_ones(1), w]))
        else:
            probs = torch.sigmoid(logits)
            target = _regions(label, self.scheme)
            ce = F.binary_cross_entropy_with_logits(logits, target, weight=None if w is None else w.view(1, -1, 1, 1, 1))
        dice = soft_dice_loss(probs, target, batch_dice=cfg.batch_dice, smooth=cfg.smooth, weights=w,
                              squared=cfg.squared_dice)
        return cfg.dice_weight * dice + cfg.ce_weight * ce
