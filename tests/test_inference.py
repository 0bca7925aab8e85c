"""Sliding-window inference on tiny volumes with models whose output is known."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.inference import (
    gaussian_importance,
    pad_to_patch,
    probs_to_labels,
    sliding_window_predict,
    window_starts,
)

PATCH = (8, 8, 8)


def identity_conv(channels: int) -> nn.Conv3d:
    conv = nn.Conv3d(channels, channels, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(channels).reshape(channels, channels, 1, 1, 1))
        assert conv.bias is not None
        conv.bias.zero_()
    return conv.eval()


def symmetric_conv(channels: int, seed: int = 0) -> nn.Conv3d:
    """3x3x3 conv whose kernel is invariant under every flip: flip-equivariant."""
    torch.manual_seed(seed)
    conv = nn.Conv3d(channels, channels, kernel_size=3, padding=1)
    with torch.no_grad():
        w = conv.weight.clone()
        flips = [f for r in range(4) for f in itertools.combinations((2, 3, 4), r)]
        conv.weight.copy_(torch.stack([w.flip(f) for f in flips]).mean(dim=0))
    return conv.eval()


class DeepSupervision(nn.Module):
    """Returns [full-resolution output, a half-resolution one], like a U-Net with deep supervision."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x * 1.0, x[:, :, ::2, ::2, ::2]]


def volume(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_window_starts() -> None:
    assert window_starts(8, 8, 4) == [0]
    assert window_starts(20, 8, 4) == [0, 4, 8, 12]
    assert window_starts(21, 8, 4) == [0, 4, 8, 12, 13]  # last flush with the end
    with pytest.raises(ConfigError, match="smaller than the patch"):
        window_starts(5, 8, 4)


def test_gaussian_importance() -> None:
    w = gaussian_importance((16, 9, 5))
    assert w.shape == (16, 9, 5) and w.dtype == torch.float32
    assert w.max().item() == pytest.approx(1.0) and w.min().item() > 0
    assert torch.equal(w, w.flip(0, 1, 2))
    tiny = gaussian_importance((64, 64, 64), sigma_scale=0.01)  # corners underflow to 0
    assert tiny.min().item() > 0


def test_pad_to_patch_roundtrip() -> None:
    vol = volume((2, 5, 8, 11))
    padded, crop = pad_to_patch(vol, PATCH)
    assert padded.shape == (2, 8, 8, 11)
    assert torch.equal(padded[(slice(None), *crop)], vol)


@pytest.mark.parametrize(
    "shape",
    [(2, 5, 13, 8), (2, 8, 8, 8), (1, 19, 9, 11), (3, 3, 3, 3)],
    ids=["smaller-not-multiple-exact", "exactly-patch", "not-multiple", "smaller-everywhere"],
)
def test_identity_reproduces_input(shape: tuple[int, ...]) -> None:
    vol = volume(shape)
    out = sliding_window_predict(identity_conv(shape[0]), vol, patch_size=PATCH, output="logits")
    assert out.shape == vol.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, vol, atol=1e-5, rtol=1e-5)
    out = sliding_window_predict(nn.Identity(), vol, patch_size=PATCH, overlap=0.3, output="logits")
    torch.testing.assert_close(out, vol, atol=1e-5, rtol=1e-5)


def test_softmax_output_is_probability() -> None:
    vol = volume((4, 10, 9, 12))
    out = sliding_window_predict(nn.Identity(), vol, patch_size=PATCH)
    torch.testing.assert_close(out, torch.softmax(vol, dim=0), atol=1e-5, rtol=1e-5)
    out = sliding_window_predict(nn.Identity(), vol, patch_size=PATCH, output="sigmoid")
    torch.testing.assert_close(out, torch.sigmoid(vol), atol=1e-5, rtol=1e-5)


def test_mirroring_with_equivariant_model() -> None:
    vol = volume((2, 12, 10, 9))
    model = symmetric_conv(2)
    plain = sliding_window_predict(model, vol, patch_size=PATCH)
    mirrored = sliding_window_predict(model, vol, patch_size=PATCH, mirror_axes=(0, 1, 2))
    torch.testing.assert_close(mirrored, plain, atol=1e-5, rtol=1e-5)


def test_deep_supervision_list() -> None:
    vol = volume((2, 10, 9, 8))
    out = sliding_window_predict(DeepSupervision(), vol, patch_size=PATCH, output="logits")
    torch.testing.assert_close(out, vol, atol=1e-5, rtol=1e-5)


def test_batch_size_invariance() -> None:
    vol = volume((2, 17, 12, 10))
    model = symmetric_conv(2)
    one = sliding_window_predict(model, vol, patch_size=PATCH, batch_size=1)
    three = sliding_window_predict(model, vol, patch_size=PATCH, batch_size=3)
    torch.testing.assert_close(one, three, atol=1e-6, rtol=1e-6)


def test_autocast_bfloat16_close() -> None:
    vol = volume((2, 10, 9, 8))
    out = sliding_window_predict(identity_conv(2), vol, patch_size=PATCH, autocast_dtype=torch.bfloat16)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.softmax(vol, dim=0), atol=2e-2, rtol=2e-2)


class NanUnderAutocast(nn.Module):
    """Identity in float32, NaN under autocast: a reduced-precision kernel's rare NaN, on demand."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float("nan") if torch.is_autocast_enabled(x.device.type) else x


def test_a_window_that_gives_nan_under_autocast_is_recomputed_in_float32() -> None:
    vol = volume((2, 10, 9, 8))
    out = sliding_window_predict(NanUnderAutocast(), vol, patch_size=PATCH, autocast_dtype=torch.bfloat16,
                                 mirror_axes=(0,))
    torch.testing.assert_close(out, torch.softmax(vol, dim=0))


def test_result_is_a_normal_tensor() -> None:
    out = sliding_window_predict(nn.Identity(), volume((1, 8, 8, 8)), patch_size=PATCH)
    out += 1  # would fail on an inference tensor outside inference mode


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"overlap": 1.0}, "overlap"),
        ({"batch_size": 0}, "batch_size"),
        ({"mirror_axes": (3,)}, "mirror_axes"),
        ({"output": "probs"}, "output"),
        ({"patch_size": (8, 8)}, "patch_size"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"patch_size": PATCH, **kwargs}
    with pytest.raises(ConfigError, match=match):
        sliding_window_predict(nn.Identity(), volume((1, 8, 8, 8)), **args)  # type: ignore[arg-type]


def test_probs_to_labels_softmax() -> None:
    probs = torch.zeros(4, 2, 2, 1)
    for cls, (x, y) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        probs[cls, x, y, 0] = 1.0
    labels = probs_to_labels(probs, "softmax")
    assert labels.dtype == torch.uint8
    assert labels[:, :, 0].tolist() == [[0, 1], [2, 3]]


def test_probs_to_labels_sigmoid() -> None:
    # Voxels along X: nothing, WT only, WT+TC, WT+TC+ET, ET alone (overwrites to 3).
    wt = [0.1, 0.9, 0.9, 0.9, 0.2]
    tc = [0.1, 0.2, 0.8, 0.8, 0.2]
    et = [0.1, 0.2, 0.3, 0.7, 0.6]
    probs = torch.tensor([wt, tc, et]).reshape(3, 5, 1, 1)
    labels = probs_to_labels(probs, "sigmoid")
    assert labels.dtype == torch.uint8
    assert labels.flatten().tolist() == [0, 2, 1, 3, 3]
    with pytest.raises(ConfigError, match="3 region channels"):
        probs_to_labels(torch.zeros(4, 2, 2, 2), "sigmoid")
    with pytest.raises(ConfigError, match="mode"):
        probs_to_labels(probs, "argmax")  # type: ignore[arg-type]


def test_mirroring_averages_flipped_back_predictions() -> None:
    vol = volume((2, 8, 8, 8))  # one window, Gaussian weights cancel out
    torch.manual_seed(1)
    model = nn.Conv3d(2, 2, kernel_size=3, padding=1).eval()  # not flip-equivariant
    out = sliding_window_predict(model, vol, patch_size=PATCH, mirror_axes=(0, 2))
    with torch.no_grad():
        flips = [(), (2,), (4,), (2, 4)]
        preds = [torch.softmax(model(vol[None].flip(f)).flip(f), dim=1) for f in flips]
    expected = torch.stack(preds).mean(dim=0)[0]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    plain = sliding_window_predict(model, vol, patch_size=PATCH)
    assert not torch.allclose(out, plain, atol=1e-3)
