"""Dice + CE losses over classes and BraTS regions, with deep supervision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError
from pipeline.losses import (
    LossConfig,
    SegmentationLoss,
    labels_to_onehot,
    labels_to_regions,
    num_outputs,
    soft_dice_loss,
)
from pipeline.model import build_model, model_preset

MODES = ["classes", "regions"]


def _label(seed: int = 0, size: int = 8, absent: int | None = None) -> torch.Tensor:
    """(2, size, size, size) int64 labels 0..3 with a blob of each class; ``absent`` is left out."""
    gen = torch.Generator().manual_seed(seed)
    label = torch.zeros(2, size, size, size, dtype=torch.long)
    label[:, 2:6, 2:6, 2:6] = 2
    label[:, 3:5, 3:5, 2:4] = 1
    label[:, 3:5, 3:5, 4:6] = 3
    label[1] = torch.roll(label[1], shifts=int(torch.randint(1, 3, (1,), generator=gen)), dims=0)
    if absent is not None:
        label[label == absent] = 2 if absent != 2 else 0
    return label


def _perfect_logits(label: torch.Tensor, mode: str, scale: float = 60.0) -> torch.Tensor:
    """Huge logits whose softmax / sigmoid reproduces ``label`` exactly (to float precision)."""
    target = labels_to_onehot(label) if mode == "classes" else labels_to_regions(label)
    return (2 * target - 1) * scale


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("absent", [None, 1, 3])
@pytest.mark.parametrize("batch_dice", [False, True])
def test_perfect_prediction_has_near_zero_loss(mode: str, absent: int | None, batch_dice: bool) -> None:
    label = _label(absent=absent)
    loss = SegmentationLoss(LossConfig(mode=mode, batch_dice=batch_dice))(_perfect_logits(label, mode), label)
    assert torch.isfinite(loss) and 0 <= float(loss) < 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_wrong_prediction_has_large_loss(mode: str) -> None:
    label = _label()
    wrong = _label(seed=1).flip(1)  # shifted tumour
    wrong[label == 0] = 3  # and tumour predicted everywhere in the background
    loss = SegmentationLoss(LossConfig(mode=mode))(_perfect_logits(wrong, mode), label)
    assert float(loss) > 1.0


def test_dice_absent_region_empty_vs_nonempty() -> None:
    target = torch.zeros(1, 1, 4, 4, 4)
    empty = torch.zeros(1, 1, 4, 4, 4)
    loss_empty = soft_dice_loss(empty, target, batch_dice=False, smooth=1e-5)
    assert torch.isfinite(loss_empty) and float(loss_empty) < 1e-6
    some = empty.clone()
    some[0, 0, 0, 0, :2] = 0.5  # one voxel's worth of false positive
    assert float(soft_dice_loss(some, target, batch_dice=False, smooth=1e-5)) > 0.99


def test_dice_background_excluded_in_class_mode() -> None:
    # All background, predicted all background: class Dice must not be dominated by it.
    label = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    logits = _perfect_logits(label, "classes")
    loss_fn = SegmentationLoss(LossConfig(mode="classes", ce_weight=0.0))
    assert float(loss_fn(logits, label)) < 1e-3
    logits[:, 1] = 100.0  # predict necrosis everywhere
    assert float(loss_fn(logits, label)) > 0.3


def test_regions_and_onehot() -> None:
    label = torch.tensor([0, 1, 2, 3]).view(1, 4, 1, 1)
    regions = labels_to_regions(label)[0, :, :, 0, 0]
    expected = torch.tensor([[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]], dtype=torch.float32)
    assert torch.equal(regions, expected)
    assert torch.equal(labels_to_onehot(label)[0, :, :, 0, 0], torch.eye(4))
    for bad in (label + 1, label.float(), label[0]):
        with pytest.raises(ValueError):
            labels_to_onehot(bad)
        with pytest.raises(ValueError):
            labels_to_regions(bad)


@pytest.mark.parametrize("mode", MODES)
def test_deep_supervision_list(mode: str) -> None:
    label = _label(size=8)
    perfect = [_perfect_logits(label[:, s // 2 :: s, s // 2 :: s, s // 2 :: s], mode) for s in (1, 2, 4)]
    loss_fn = SegmentationLoss(LossConfig(mode=mode))
    assert float(loss_fn(perfect, label)) < 1e-3
    single = loss_fn(perfect[0], label)
    wrong = [perfect[0], -perfect[1], perfect[2]]
    # Scale 1/2 carries weight (1/2) / (1 + 1/2 + 1/4) of the total.
    expected = (0.5 / 1.75) * float(loss_fn(-perfect[1], label[:, 1::2, 1::2, 1::2])) + float(single)
    assert float(loss_fn(wrong, label)) == pytest.approx(expected, rel=1e-4)


def test_loss_checks_channels_and_shapes() -> None:
    label = _label()
    with pytest.raises(ConfigError, match="3 output channels"):
        SegmentationLoss(LossConfig(mode="regions"))(torch.zeros(2, 4, 8, 8, 8), label)
    with pytest.raises(ValueError, match="do not match"):
        SegmentationLoss(LossConfig())(torch.zeros(2, 4, 8, 8, 4), label)
    with pytest.raises(ValueError, match="range"):
        SegmentationLoss(LossConfig())(torch.zeros(2, 4, 8, 8, 8), label * 2)


def test_config_round_trip_and_validation() -> None:
    cfg = LossConfig(mode="regions", batch_dice=True, smooth=1e-4, dice_weight=2.0, ce_weight=0.5)
    assert LossConfig.from_dict(cfg.to_dict()) == cfg
    assert num_outputs("classes") == 4 and num_outputs("regions") == 3
    with pytest.raises(ConfigError, match="focal"):
        LossConfig(mode="focal")
    with pytest.raises(ConfigError, match="'yes'"):
        LossConfig(batch_dice="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="0.0"):
        LossConfig(smooth=0.0)
    with pytest.raises(ConfigError, match="-1"):
        LossConfig(ce_weight=-1.0)
    with pytest.raises(ConfigError, match="nan"):
        LossConfig(dice_weight=float("nan"))
    with pytest.raises(ConfigError, match="gamma"):
        LossConfig.from_dict({"mode": "classes", "gamma": 2.0})


@pytest.mark.parametrize("batch_dice", [False, True])
def test_region_weights_weigh_each_region_in_dice_and_bce(batch_dice: bool) -> None:
    label = _label()
    logits = torch.randn(2, 3, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = SegmentationLoss(LossConfig(mode="regions", batch_dice=batch_dice))(logits, label)
    equal = SegmentationLoss(LossConfig(mode="regions", batch_dice=batch_dice, region_weights=(2.0, 2.0, 2.0)))
    assert torch.allclose(equal(logits, label), plain)  # normalised: equal weights are no weights
    weights = torch.tensor([1.0, 2.0, 3.0])
    loss = SegmentationLoss(LossConfig(mode="regions", batch_dice=batch_dice, region_weights=(1.0, 2.0, 3.0)))
    target, probs = labels_to_regions(label), torch.sigmoid(logits)
    dice = torch.stack([soft_dice_loss(probs[:, c:c + 1], target[:, c:c + 1], batch_dice=batch_dice, smooth=1e-5)
                        for c in range(3)])
    bce = torch.stack([F.binary_cross_entropy_with_logits(logits[:, c], target[:, c]) for c in range(3)])
    expected = (weights * dice).sum() / weights.sum() + (weights / weights.mean() * bce).mean()
    assert torch.allclose(loss(logits, label), expected, atol=1e-6)
    assert not torch.allclose(loss(logits, label), plain)


@pytest.mark.parametrize("batch_dice", [False, True])
def test_squared_dice_squares_the_predictions_in_the_denominator(batch_dice: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    probs = torch.rand(2, 3, 6, 6, 6, generator=gen)
    target = (torch.rand(2, 3, 6, 6, 6, generator=gen) > 0.6).float()
    axes = (0, 2, 3, 4) if batch_dice else (2, 3, 4)
    tp = (probs * target).sum(axes)
    expected = 1 - ((2 * tp + 1e-5) / ((probs**2).sum(axes) + target.sum(axes) + 1e-5)).mean()
    squared = soft_dice_loss(probs, target, batch_dice=batch_dice, smooth=1e-5, squared=True)
    assert torch.allclose(squared, expected, atol=1e-6)
    # unsure voxels cost less than in the plain soft Dice; certain ones exactly the same
    assert float(squared) < float(soft_dice_loss(probs, target, batch_dice=batch_dice, smooth=1e-5))
    certain = target.clone()
    certain[:, :, 0] = 1 - certain[:, :, 0]  # some confident mistakes, no unsure voxel
    assert torch.allclose(soft_dice_loss(certain, target, batch_dice=batch_dice, smooth=1e-5, squared=True),
                          soft_dice_loss(certain, target, batch_dice=batch_dice, smooth=1e-5))
    # through the loss module, in both modes
    label = _label()
    for mode, channels in (("regions", 3), ("classes", 4)):
        logits = torch.randn(2, channels, 8, 8, 8, generator=gen)
        plain = SegmentationLoss(LossConfig(mode=mode, batch_dice=batch_dice))(logits, label)
        sq = SegmentationLoss(LossConfig(mode=mode, batch_dice=batch_dice, squared_dice=True))(logits, label)
        assert float(sq) < float(plain)
    with pytest.raises(ConfigError, match="squared_dice must be a bool"):
        LossConfig(squared_dice=1)  # type: ignore[arg-type]


def test_class_weights_keep_the_background_at_one() -> None:
    label = _label()
    logits = torch.randn(2, 4, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    loss = SegmentationLoss(LossConfig(mode="classes", region_weights=(1.0, 1.0, 4.0), dice_weight=0.0))
    weights = torch.tensor([1.0, 1.0, 1.0, 4.0]) / 2.0  # background 1, then (1, 1, 4) over their mean 2
    weights[0] = 1.0
    assert torch.allclose(loss(logits, label), F.cross_entropy(logits, label, weight=weights), atol=1e-6)


def test_region_weights_are_validated_and_round_trip() -> None:
    cfg = LossConfig(mode="regions", region_weights=[1, 2, 2])  # type: ignore[arg-type]
    assert cfg.region_weights == (1, 2, 2) and LossConfig.from_dict(cfg.to_dict()) == cfg
    assert LossConfig.from_dict({**cfg.to_dict(), "region_weights": [1, 2, 2]}) == cfg  # as JSON gives it back
    for bad in [(1.0, 2.0), (1.0, 0.0, 1.0), (1.0, -1.0, 1.0), (1.0, float("inf"), 1.0), (True, 1.0, 1.0)]:
        with pytest.raises(ConfigError, match="3 finite numbers > 0 .*region"):
            LossConfig(mode="regions", region_weights=bad)
    with pytest.raises(ConfigError, match="tumour class"):
        LossConfig(mode="classes", region_weights=(1.0, 1.0, 1.0, 1.0))
    # with the resection cavity there are four regions
    assert LossConfig(mode="regions", labels="glioma-rc", region_weights=(1.0, 1.0, 1.0, 2.0)).scored_channels == 4
    with pytest.raises(ConfigError, match="4 finite numbers"):
        LossConfig(mode="regions", labels="glioma-rc", region_weights=(1.0, 2.0, 2.0))
    with pytest.raises(ConfigError, match="sequence"):
        LossConfig(region_weights=2.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", MODES)
def test_gradients_reach_first_conv(mode: str) -> None:
    model = build_model(model_preset("small", out_channels=num_outputs(mode))).train()
    label = _label(size=16)
    loss = SegmentationLoss(LossConfig(mode=mode))(model(torch.randn(2, 4, 16, 16, 16)), label)
    loss.backward()
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv3d))
    assert first.weight.grad is not None and float(first.weight.grad.abs().sum()) > 0


def test_sgd_steps_reduce_loss_on_fixed_batch() -> None:
    torch.manual_seed(0)
    model = build_model(model_preset("small", out_channels=4)).train()
    label = _label(size=16)
    image = torch.randn(2, 4, 16, 16, 16) + labels_to_onehot(label) * 2.0
    loss_fn = SegmentationLoss(LossConfig(mode="classes"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = loss_fn(model(image), label)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]
