"""The augmentation levels: one frozen config per level, and the seed streams of its draws."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import Config
from pipeline.errors import ConfigError

SPATIAL_STREAM = 7  # third seed word of the per-sample spatial generator
INTENSITY_STREAM = 11  # third seed word of the per-sample intensity/mirroring generator


@dataclass(frozen=True)
class AugmentConfig(Config):
    """Probabilities and ranges of every transform (see the module docstring for the levels)."""

    name: str = "custom"
    mirror: bool = False
    p_rotation: float = 0.0
    max_rotation_deg: float = 30.0
    p_scaling: float = 0.0
    scaling: tuple[float, float] = (0.7, 1.4)
    scale_per_axis: bool = False
    p_elastic: float = 0.0
    elastic_voxels: float = 6.0  # largest displacement
    elastic_spacing: int = 16  # control-point spacing in voxels
    p_noise: float = 0.0
    noise_variance: tuple[float, float] = (0.0, 0.1)
    p_blur: float = 0.0
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_brightness: float = 0.0
    brightness: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.0
    contrast: tuple[float, float] = (0.75, 1.25)
    p_lowres: float = 0.0
    lowres_zoom: tuple[float, float] = (0.5, 1.0)
    p_gamma_inverted: float = 0.0
    p_gamma: float = 0.0
    gamma: tuple[float, float] = (0.7, 1.5)
    p_additive: float = 0.0
    additive_sigma: float = 0.1
    p_scale_shift: float = 0.0  # the light level's intensity jitter
    p_per_channel: float = 0.5  # blur and low resolution pick channels with this probability

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if name.startswith("p_") and not 0.0 <= value <= 1.0:
                raise ConfigError(f"augmentation {name} must be in [0, 1], got {value!r}")
        for name in ("scaling", "noise_variance", "blur_sigma", "brightness", "contrast", "lowres_zoom", "gamma"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 2 or value[0] > value[1] or value[0] < 0:
                raise ConfigError(f"augmentation {name} must be a range (low <= high, >= 0), got {value!r}")
            object.__setattr__(self, name, value)

    @property
    def spatial(self) -> bool:
        return self.p_rotation > 0 or self.p_scaling > 0 or self.p_elastic > 0


NNUNET = dict(mirror=True, p_rotation=0.2, p_scaling=0.2, p_noise=0.1, p_blur=0.2, p_brightness=0.15,
              p_contrast=0.15, p_lowres=0.25, p_gamma_inverted=0.1, p_gamma=0.3)
LEVELS: dict[str, AugmentConfig] = {
    "none": AugmentConfig(name="none"),
    "light": AugmentConfig(name="light", mirror=True, p_scale_shift=1.0, p_noise=0.15,
                           noise_variance=(0.0, 0.01)),
    "nnunet": AugmentConfig(name="nnunet", **NNUNET),  # type: ignore[arg-type]
    "brats2020": AugmentConfig(name="brats2020", **{**NNUNET, "p_rotation": 0.3, "p_scaling": 0.3},  # type: ignore[arg-type]
                               scaling=(0.65, 1.6), scale_per_axis=True, p_elastic=0.3, p_additive=0.3,
                               gamma=(0.5, 1.6)),
}


def augment_level(name: str) -> AugmentConfig:
    """The named level. Raises ConfigError for an unknown name."""
    if name not in LEVELS:
        raise ConfigError(f"unknown augmentation level {name!r}; expected one of {sorted(LEVELS)}")
    return LEVELS[name]
