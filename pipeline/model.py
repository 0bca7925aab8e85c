"""3D U-Nets for BraTS segmentation and the frozen config that rebuilds them.

Two architectures share one :class:`ModelConfig`:

* ``arch="seed"``: :class:`SeedUNet3D`, the write-up's network (MaxPool3d
  down, DoubleConv = (Conv3d 3x3x3 -> norm -> ReLU) x 2, ConvTranspose3d up).
* ``arch="unet"``: :class:`UNet3D`, an nnU-Net-like network (strided-conv
  down, conv -> InstanceNorm -> LeakyReLU(0.01) x 2 per stage, optional deep
  supervision).
* ``arch="resenc"``: :class:`UNet3D` with a residual encoder, as nnU-Net's
  ResEnc presets (Isensee et al. 2024, "nnU-Net revisited"): a stem conv, then
  :data:`RESENC_BLOCKS` residual blocks per encoder stage and one conv per
  decoder stage.

Inputs are ``(B, C, X, Y, Z)``; every spatial size must be divisible by
``2 ** (depth - 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.config import Config
from pipeline.errors import ConfigError

ARCHS = ("seed", "unet", "resenc")
#: Residual blocks per encoder stage of ``arch="resenc"`` (full resolution first; a network of depth ``d``
#: takes the first ``d``), nnU-Net's ResEnc pattern.
RESENC_BLOCKS = (1, 3, 4, 6, 6, 6, 6, 6)
NORMS = ("instance", "batch")
PRESETS = ("seed", "small", "small-resenc", "medium", "brats")


@dataclass(frozen=True)
class ModelConfig(Config):
    """Everything needed to rebuild a network; stored in every checkpoint.

    Attributes:
        preset: name of the preset this came from, or ``"custom"``.
        in_channels: input modalities (4: FLAIR, T1, T1ce, T2).
        out_channels: 4 for softmax classes, 3 for sigmoid WT/TC/ET regions.
        arch: ``"seed"`` (the write-up's U-Net), ``"unet"`` (nnU-Net-like)
            or ``"resenc"`` (nnU-Net-like with a residual encoder).
        base_width: feature channels at full resolution.
        max_width: cap on feature channels; level ``i`` has
            ``min(base_width * 2**i, max_width)``.
        depth: number of resolution levels (``depth - 1`` downsamplings).
        norm: ``"instance"`` or ``"batch"``.
        deep_supervision: ``arch="unet"`` or ``"resenc"``; in training mode the model
            then returns a list of logits ``[full, 1/2, 1/4, ...]``.
    """

    preset: str = "custom"
    in_channels: int = 4
    out_channels: int = 4
    arch: str = "unet"
    base_width: int = 32
    max_width: int = 320
    depth: int = 6
    norm: str = "instance"
    deep_supervision: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.preset, str) or not self.preset:
            raise ConfigError(f"preset must be a non-empty string, got {self.preset!r}")
        lows = (("in_channels", 1), ("out_channels", 1), ("base_width", 1), ("max_width", 1), ("depth", 2))
        for name, low in lows:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
        if self.max_width < self.base_width:
            raise ConfigError(f"max_width {self.max_width} < base_width {self.base_width}")
        if self.depth > 8:
            raise ConfigError(f"depth must be <= 8 (input divisible by 2**(depth-1)), got {self.depth}")
        if self.arch not in ARCHS:
            raise ConfigError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.norm not in NORMS:
            raise ConfigError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if not isinstance(self.deep_supervision, bool):
            raise ConfigError(f"deep_supervision must be a bool, got {self.deep_supervision!r}")
        if self.arch == "seed" and self.deep_supervision:
            raise ConfigError("arch 'seed' has no deep supervision; got deep_supervision=True")

    @property
    def widths(self) -> tuple[int, ...]:
        """Feature channels per resolution level, full resolution first."""
        return tuple(min(self.base_width * 2**i, self.max_width) for i in range(self.depth))

    @property
    def divisor(self) -> int:
        """Every spatial input size must be a multiple of this."""
        return int(2 ** (self.depth - 1))



def model_preset(name: str, *, out_channels: int, deep_supervision: bool | None = None) -> ModelConfig:
    """Named configurations.

    * ``seed``: the write-up's UNet3D exactly (32-64-128, BatchNorm, MaxPool).
    * ``small``: the CPU-budget recipe's network, 8-16-32-64 over 4 levels,
      InstanceNorm, deep supervision on (0.35 M parameters): under a CPU time
      budget it sees several times the patches of a wider network (step
      times: docs/benchmarks.md, "CPU training step").
    * ``small-resenc``: ``small``'s widths with a residual encoder
      (``arch="resenc"``: 1, 3, 4, 6 residual blocks per stage, one conv per
      decoder stage; 1.6 M parameters, most of them in the lowest stage).
    * ``medium``: 16 ... 256 channels over 5 levels, InstanceNorm, deep
      supervision on (5.6 M parameters).
    * ``brats``: GPU, nnU-Net 3d_fullres-like for 128^3 patches: 6 levels
      (128 -> 4), 32 ... 320 channels, deep supervision on.

    Args:
        name: one of ``PRESETS``.
        out_channels: 4 (classes) or 3 (regions); see ``losses.num_outputs``.
        deep_supervision: override the preset's default (None keeps it).

    Returns:
        The validated config.

    Raises:
        ConfigError: unknown preset, or an invalid override.
    """
    presets: dict[str, dict[str, Any]] = {
        "seed": dict(arch="seed", base_width=32, max_width=128, depth=3, norm="batch", deep_supervision=False),
        "small": dict(arch="unet", base_width=8, max_width=64, depth=4, norm="instance", deep_supervision=True),
        "small-resenc": dict(arch="resenc", base_width=8, max_width=64, depth=4, norm="instance",
                             deep_supervision=True),
        "medium": dict(arch="unet", base_width=16, max_width=256, depth=5, norm="instance", deep_supervision=True),
        "brats": dict(arch="unet", base_width=32, max_width=320, depth=6, norm="instance", deep_supervision=True),
    }
    if name not in presets:
        raise ConfigError(f"unknown model preset {name!r}; expected one of {PRESETS}")
    fields = presets[name]
    if deep_supervision is not None:
        fields["deep_supervision"] = deep_supervision
    return ModelConfig(preset=name, in_channels=4, out_channels=out_channels, **fields)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels, eps=1e-5)
    return nn.InstanceNorm3d(channels, eps=1e-5, affine=True)


def _check_input(x: torch.Tensor, cfg: ModelConfig) -> None:
    """Raise ValueError unless ``x`` is (B, in_channels, X, Y, Z) with sizes divisible."""
    if x.ndim != 5 or x.shape[1] != cfg.in_channels:
        raise ValueError(f"expected input (B, {cfg.in_channels}, X, Y, Z), got {tuple(x.shape)}")
    if any(s % cfg.divisor for s in x.shape[2:]):
        raise ValueError(
            f"spatial size {tuple(x.shape[2:])} must be divisible by 2**(depth-1) = {cfg.divisor}"
        )


class DoubleConv(nn.Sequential):
    """(Conv3d 3x3x3 pad 1 -> norm -> ReLU) x 2, as in the write-up."""

    def __init__(self, in_ch: int, out_ch: int, norm: str) -> None:
        super().__init__(
            nn.Conv3d(in_ch, out_ch, 3, padding=1),
            _norm(norm, out_ch),
            nn.ReLU(inplace=True),
            nn.Conv3d(out_ch, out_ch, 3, padding=1),
            _norm(norm, out_ch),
            nn.ReLU(inplace=True),
        )


class SeedUNet3D(nn.Module):
    """The write-up's U-Net: MaxPool3d down, ConvTranspose3d up, one 1x1x1 head.

    With the ``seed`` preset (depth 3, widths 32-64-128, BatchNorm) this is
    layer-for-layer the original; depth, widths and norm follow ``cfg``.
    Spatial input sizes must be divisible by ``2 ** (depth - 1)`` (4 for seed).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.arch != "seed":
            raise ConfigError(f"SeedUNet3D needs arch='seed', got {cfg.arch!r}")
        self.cfg = cfg
        w = cfg.widths
        ins = (cfg.in_channels, *w[:-1])
        self.encoders = nn.ModuleList(DoubleConv(i, o, cfg.norm) for i, o in zip(ins, w))
        self.pool = nn.MaxPool3d(2)
        self.ups = nn.ModuleList(
            nn.ConvTranspose3d(w[i + 1], w[i], 2, stride=2) for i in reversed(range(cfg.depth - 1))
        )
        self.decoders = nn.ModuleList(
            DoubleConv(2 * w[i], w[i], cfg.norm) for i in reversed(range(cfg.depth - 1))
        )
        self.final = nn.Conv3d(w[0], cfg.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, X, Y, Z) float -> logits (B, out_channels, X, Y, Z).

        Raises:
            ValueError: wrong channel count or spatial size not divisible.
        """
        _check_input(x, self.cfg)
        skips = []
        for i, enc in enumerate(self.encoders):
            x = enc(x if i == 0 else self.pool(x))
            skips.append(x)
        for up, dec, skip in zip(self.ups, self.decoders, reversed(skips[:-1])):
            x = dec(torch.cat([up(x), skip], dim=1))
        out: torch.Tensor = self.final(x)
        return out


class ConvNormAct(nn.Sequential):
    """Conv3d 3x3x3 (optionally stride 2) -> norm -> LeakyReLU(0.01)."""

    def __init__(self, in_ch: int, out_ch: int, norm: str, stride: int = 1) -> None:
        super().__init__(
            nn.Conv3d(in_ch, out_ch, 3, stride=stride, padding=1),
            _norm(norm, out_ch),
            nn.LeakyReLU(0.01, inplace=True),
        )


def _stage(in_ch: int, out_ch: int, norm: str, stride: int) -> nn.Sequential:
    return nn.Sequential(ConvNormAct(in_ch, out_ch, norm, stride), ConvNormAct(out_ch, out_ch, norm))


class ResidualBlock(nn.Module):
    """Conv3d 3x3x3 (optionally stride 2) -> norm -> LeakyReLU -> Conv3d 3x3x3 -> norm, plus the input, then
    LeakyReLU(0.01). Where the block downsamples or widens, the input takes a 2x2x2 average pool and a 1x1x1
    conv -> norm on its way (nnU-Net's ``BasicBlockD``)."""

    def __init__(self, in_ch: int, out_ch: int, norm: str, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ConvNormAct(in_ch, out_ch, norm, stride),
            nn.Conv3d(out_ch, out_ch, 3, padding=1),
            _norm(norm, out_ch),
        )
        skip: list[nn.Module] = []
        if stride != 1:
            skip.append(nn.AvgPool3d(stride, stride))
        if in_ch != out_ch:
            skip += [nn.Conv3d(in_ch, out_ch, 1, bias=False), _norm(norm, out_ch)]
        self.skip = nn.Sequential(*skip)
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.act(self.body(x) + self.skip(x))
        return out


def _residual_stage(in_ch: int, out_ch: int, norm: str, stride: int, blocks: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(in_ch, out_ch, norm, stride),
                         *(ResidualBlock(out_ch, out_ch, norm) for _ in range(blocks - 1)))


class UNet3D(nn.Module):
    """nnU-Net-like 3D U-Net (``arch="unet"``, or ``"resenc"`` for a residual encoder).

    Encoder level ``i`` is two ConvNormAct blocks, the first strided (stride
    2) for ``i > 0``; the decoder upsamples with ConvTranspose3d (k2 s2),
    concatenates the skip and applies two ConvNormAct blocks. Convs use He
    init with LeakyReLU slope 0.01, as nnU-Net does. With ``arch="resenc"``
    a stem ConvNormAct is followed by ``RESENC_BLOCKS[i]``
    :class:`ResidualBlock` at level ``i`` (the first strided for ``i > 0``),
    and each decoder level applies one ConvNormAct.

    With ``deep_supervision`` there is one 1x1x1 head per decoder level at
    scales 1, 1/2, ..., 1/2**(depth-3) (the lowest decoder level gets none,
    as nnU-Net gives it weight 0). Training mode then returns that list of
    logits, full resolution first; eval mode always returns one tensor.
    Spatial input sizes must be divisible by ``2 ** (depth - 1)``; in
    training mode InstanceNorm also needs more than one voxel at the lowest
    level (e.g. >= 16^3 inputs for the 4-level ``small`` preset).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.arch not in ("unet", "resenc"):
            raise ConfigError(f"UNet3D needs arch 'unet' or 'resenc', got {cfg.arch!r}")
        self.cfg = cfg
        w = cfg.widths
        levels = list(reversed(range(cfg.depth - 1)))  # decoder order: lowest first
        self.ups = nn.ModuleList(nn.ConvTranspose3d(w[i + 1], w[i], 2, stride=2) for i in levels)
        if cfg.arch == "resenc":
            ins = (w[0], *w[:-1])
            stages = [_residual_stage(i, o, cfg.norm, 1 if k == 0 else 2, RESENC_BLOCKS[k])
                      for k, (i, o) in enumerate(zip(ins, w))]
            stages[0] = nn.Sequential(ConvNormAct(cfg.in_channels, w[0], cfg.norm), *stages[0])  # the stem first
            self.encoders = nn.ModuleList(stages)
            self.decoders = nn.ModuleList(nn.Sequential(ConvNormAct(2 * w[i], w[i], cfg.norm)) for i in levels)
        else:
            ins = (cfg.in_channels, *w[:-1])
            self.encoders = nn.ModuleList(
                _stage(i, o, cfg.norm, 1 if k == 0 else 2) for k, (i, o) in enumerate(zip(ins, w))
            )
            self.decoders = nn.ModuleList(_stage(2 * w[i], w[i], cfg.norm, 1) for i in levels)
        n_heads = max(1, cfg.depth - 2) if cfg.deep_supervision else 1
        self.heads = nn.ModuleList(nn.Conv3d(w[i], cfg.out_channels, 1) for i in range(n_heads))
        self.apply(_he_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Segment a batch.

        Args:
            x: (B, in_channels, X, Y, Z) float, sizes divisible by 2**(depth-1).

        Returns:
            Logits (B, out_channels, X, Y, Z); in training mode with deep
            supervision, a list whose item ``k`` is
            (B, out_channels, X/2**k, Y/2**k, Z/2**k).

        Raises:
            ValueError: wrong channel count or spatial size not divisible.
        """
        _check_input(x, self.cfg)
        skips = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
        outputs: list[torch.Tensor] = []
        want = len(self.heads) if self.training else 1
        n_dec = len(self.decoders)
        for k, (up, dec, skip) in enumerate(zip(self.ups, self.decoders, reversed(skips[:-1]))):
            x = dec(torch.cat([up(x), skip], dim=1))
            level = n_dec - 1 - k  # 0 is full resolution
            if level < want:
                outputs.append(self.heads[level](x))
        outputs.reverse()
        if self.cfg.deep_supervision and self.training:
            return outputs
        return outputs[0]


def _he_init(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=0.01)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_model(cfg: ModelConfig) -> nn.Module:
    """Instantiate the network ``cfg`` describes (:class:`SeedUNet3D` or :class:`UNet3D`)."""
    if cfg.arch == "seed":
        return SeedUNet3D(cfg)
    return UNet3D(cfg)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (``requires_grad``) in ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
