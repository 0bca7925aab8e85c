"""Model configs, presets, output shapes and parameter counts."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.model import (
    RESENC_BLOCKS,
    ModelConfig,
    ResidualBlock,
    SeedUNet3D,
    UNet3D,
    build_model,
    count_parameters,
    model_preset,
)


def _conv(cin: int, cout: int, k: int) -> int:
    """Conv3d / ConvTranspose3d with bias: k^3 * cin * cout weights + cout biases."""
    return k**3 * cin * cout + cout


def _double_conv(cin: int, cout: int) -> int:
    """(Conv3d 3x3x3 -> BatchNorm3d (weight + bias) -> ReLU) x 2."""
    return _conv(cin, cout, 3) + 2 * cout + _conv(cout, cout, 3) + 2 * cout


def test_seed_matches_writeup_shape_and_parameter_count() -> None:
    model = build_model(model_preset("seed", out_channels=4))
    assert isinstance(model, SeedUNet3D)
    x = torch.randn(1, 4, 32, 32, 32)
    assert model.eval()(x).shape == (1, 4, 32, 32, 32)
    expected = sum(
        [
            _double_conv(4, 32),  # enc1
            _double_conv(32, 64),  # enc2
            _double_conv(64, 128),  # enc3
            _conv(128, 64, 2),  # up1: ConvTranspose3d(128, 64, 2, stride=2)
            _double_conv(128, 64),  # dec1 (64 up + 64 skip)
            _conv(64, 32, 2),  # up2
            _double_conv(64, 32),  # dec2 (32 up + 32 skip)
            _conv(32, 4, 1),  # final 1x1x1 head
        ]
    )
    assert count_parameters(model) == expected


def test_seed_out_channels_configurable() -> None:
    model = build_model(model_preset("seed", out_channels=3)).eval()
    assert model(torch.randn(1, 4, 8, 8, 8)).shape == (1, 3, 8, 8, 8)


@pytest.mark.parametrize("depth", [2, 3, 4, 5])
def test_unet_shapes_without_deep_supervision(depth: int) -> None:
    cfg = ModelConfig(base_width=4, max_width=16, depth=depth, out_channels=4)
    model = UNet3D(cfg)
    size = 2 ** (depth - 1)  # lowest level 1 x 1 x 2: InstanceNorm needs > 1 voxel in training
    x = torch.randn(2, 4, size, size, 2 * size)
    for training in (True, False):
        out = model.train(training)(x)
        assert isinstance(out, torch.Tensor)
        assert out.shape == (2, 4, size, size, 2 * size)


@pytest.mark.parametrize("depth, n_outputs", [(2, 1), (3, 1), (4, 2), (5, 3)])
def test_unet_deep_supervision_outputs(depth: int, n_outputs: int) -> None:
    cfg = ModelConfig(base_width=4, max_width=16, depth=depth, out_channels=3, deep_supervision=True)
    model = build_model(cfg)
    size = 2 ** (depth - 1) * 2
    x = torch.randn(1, 4, size, size, size)
    outs = model.train()(x)
    assert isinstance(outs, list) and len(outs) == n_outputs
    for k, out in enumerate(outs):
        assert out.shape == (1, 3, size >> k, size >> k, size >> k)
    out = model.eval()(x)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, size, size, size)


def test_unet_channel_widths_and_norm() -> None:
    cfg = ModelConfig(base_width=4, max_width=12, depth=4, norm="batch")
    assert cfg.widths == (4, 8, 12, 12)
    model = UNet3D(cfg)
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())
    inst = UNet3D(ModelConfig(base_width=4, max_width=12, depth=4))
    norms = [m for m in inst.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert norms and all(m.affine and m.eps == 1e-5 for m in norms)


@pytest.mark.parametrize("depth, n_outputs", [(2, 1), (4, 2), (5, 3)])
def test_residual_encoder_stages_and_outputs(depth: int, n_outputs: int) -> None:
    cfg = ModelConfig(arch="resenc", base_width=4, max_width=16, depth=depth, out_channels=3, deep_supervision=True)
    model = build_model(cfg)
    assert isinstance(model, UNet3D)
    blocks = [sum(isinstance(m, ResidualBlock) for m in enc.modules()) for enc in model.encoders]
    assert blocks == list(RESENC_BLOCKS[:depth])
    # one conv per decoder level, against two in arch="unet"
    assert all(sum(isinstance(m, torch.nn.Conv3d) for m in dec.modules()) == 1 for dec in model.decoders)
    plain = build_model(ModelConfig(base_width=4, max_width=16, depth=depth, out_channels=3, deep_supervision=True))
    assert len(model.heads) == len(plain.heads) and len(model.ups) == len(plain.ups)
    size = 2 ** (depth - 1) * 2
    x = torch.randn(2, 4, size, size, size)
    outs = model.train()(x)
    assert isinstance(outs, list) and len(outs) == n_outputs
    for k, out in enumerate(outs):
        assert out.shape == (2, 3, size >> k, size >> k, size >> k)
    assert model.eval()(x).shape == (2, 3, size, size, size)


def test_residual_block_adds_its_input() -> None:
    block = ResidualBlock(4, 4, "instance").eval()
    x = torch.randn(1, 4, 6, 6, 6)
    for param in block.body.parameters():  # a body that outputs zeros leaves LeakyReLU(x)
        torch.nn.init.zeros_(param)
    assert torch.allclose(block(x), torch.nn.functional.leaky_relu(x, 0.01))
    assert len(block.skip) == 0
    down = ResidualBlock(4, 8, "instance", stride=2).eval()
    assert down(x).shape == (1, 8, 3, 3, 3)
    assert isinstance(down.skip[0], torch.nn.AvgPool3d) and isinstance(down.skip[1], torch.nn.Conv3d)
    # a block's parameters: two 3^3 convs with bias and their norms, the 1x1x1 projection and its norm
    assert count_parameters(down) == _conv(4, 8, 3) + _conv(8, 8, 3) + 4 * 8 + 4 * 8 + 2 * 8


def test_small_resenc_preset_keeps_small_widths() -> None:
    small, res = model_preset("small", out_channels=3), model_preset("small-resenc", out_channels=3)
    assert res.arch == "resenc" and res.widths == small.widths and res.deep_supervision
    assert count_parameters(build_model(res)) > 3 * count_parameters(build_model(small))


def test_bad_input_size_raises() -> None:
    model = UNet3D(ModelConfig(base_width=4, max_width=8, depth=3))
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 4, 12, 12, 10))
    with pytest.raises(ValueError, match="B, 4"):
        model(torch.randn(1, 3, 8, 8, 8))


@pytest.mark.parametrize("name", ["seed", "small", "small-resenc", "brats"])
def test_presets_build(name: str) -> None:
    cfg = model_preset(name, out_channels=4)
    model = build_model(cfg)
    assert count_parameters(model) > 0
    assert model_preset(name, out_channels=3).out_channels == 3
    assert cfg.preset == name


def test_brats_preset_is_nnunet_like() -> None:
    cfg = model_preset("brats", out_channels=3)
    assert cfg.widths == (32, 64, 128, 256, 320, 320)
    assert cfg.deep_supervision and cfg.divisor == 32
    assert not model_preset("brats", out_channels=3, deep_supervision=False).deep_supervision


def test_config_round_trip() -> None:
    for cfg in (model_preset("small", out_channels=3), ModelConfig(base_width=8, depth=3, norm="batch")):
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "bad",
    [
        {"arch": "vnet"},
        {"norm": "group"},
        {"depth": 1},
        {"depth": 9},
        {"base_width": 0},
        {"base_width": 64, "max_width": 32},
        {"in_channels": 4.0},
        {"out_channels": True},
        {"deep_supervision": 1},
        {"arch": "seed", "deep_supervision": True},
        {"preset": ""},
    ],
)
def test_bad_config_raises(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as info:
        ModelConfig(**bad)  # type: ignore[arg-type]
    assert repr(list(bad.values())[-1]) in str(info.value) or "deep supervision" in str(info.value)


def test_from_dict_rejects_unknown_keys_and_bad_presets() -> None:
    with pytest.raises(ConfigError, match="dropout"):
        ModelConfig.from_dict({**ModelConfig().to_dict(), "dropout": 0.1})
    with pytest.raises(ConfigError, match="huge"):
        model_preset("huge", out_channels=4)
    with pytest.raises(ConfigError, match="-1"):
        model_preset("small", out_channels=-1)


@pytest.mark.parametrize("arch, norm", [("seed", "batch"), ("unet", "instance"), ("resenc", "instance")])
def test_channels_last_and_autocast(arch: str, norm: str) -> None:
    cfg = ModelConfig(arch=arch, norm=norm, base_width=4, max_width=16, depth=3)
    model = build_model(cfg).eval()
    x = torch.randn(1, 4, 8, 8, 8)
    ref = model(x)
    cl_model = model.to(memory_format=torch.channels_last_3d)
    out = cl_model(x.to(memory_format=torch.channels_last_3d))
    assert torch.allclose(out, ref, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x)
    assert low.shape == ref.shape and torch.isfinite(low).all()
