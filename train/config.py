"""Training settings: one frozen dataclass, validated, serialised into the run dir and every checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import Config
from pipeline.errors import ConfigError

OPTIMIZERS = ("sgd", "adamw")
AMP = ("none", "bf16", "fp16")
LOADERS = ("threads", "processes")


@dataclass(frozen=True)
class TrainConfig(Config):
    """Every knob of a training run; CLI flags map 1:1 onto these fields.

    Data: ``cache_dir`` (a keyed cache), ``patch_size`` (voxels per axis),
    ``batch_size``, ``p_fg`` (share of tumour-centred patches), ``fold`` of
    ``n_folds`` (validation split by case id), ``augment`` (flips, intensity,
    noise), ``spatial_augment`` (small rotations and scaling, on the device).
    Model: ``preset``, ``loss_mode`` ("regions": sigmoid WT/TC/ET, Dice+BCE;
    "classes": softmax, Dice+CE), ``deep_supervision`` (None: the preset's).
    Optimisation: ``optimizer`` ("sgd": Nesterov, momentum 0.99 as nnU-Net;
    "adamw"), ``lr``, ``weight_decay``, poly schedule (exponent 0.9) over
    ``epochs`` × ``iters_per_epoch`` steps, ``amp`` (CUDA only), ``compile``,
    ``channels_last``. Loading: ``loader`` ("threads": a thread pool in the
    training process; "processes": a torch DataLoader), ``workers``.
    Validation: every ``val_every`` epochs, sliding window with ``val_overlap``
    on at most ``max_val_cases`` held-out cases (0: all).
    """

    cache_dir: str
    run_dir: str
    preset: str = "small"
    loss_mode: str = "regions"
    deep_supervision: bool | None = None
    patch_size: tuple[int, int, int] = (128, 128, 128)
    batch_size: int = 2
    epochs: int = 100
    iters_per_epoch: int = 250
    optimizer: str = "sgd"
    lr: float = 0.01
    weight_decay: float = 3e-5
    p_fg: float = 0.33
    augment: bool = True
    spatial_augment: bool = False
    fold: int = 0
    n_folds: int = 5
    seed: int = 0
    device: str = "auto"
    amp: str = "bf16"
    compile: bool = False
    channels_last: bool = False
    loader: str = "threads"
    workers: int = 2
    val_every: int = 1
    val_overlap: float = 0.5
    max_val_cases: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        checks = [
            (len(self.patch_size) == 3 and min(self.patch_size) >= 8, "patch_size", self.patch_size),
            (self.batch_size >= 1, "batch_size", self.batch_size),
            (self.epochs >= 1, "epochs", self.epochs),
            (self.iters_per_epoch >= 1, "iters_per_epoch", self.iters_per_epoch),
            (self.optimizer in OPTIMIZERS, "optimizer", self.optimizer),
            (self.lr > 0, "lr", self.lr),
            (0.0 <= self.p_fg <= 1.0, "p_fg", self.p_fg),
            (self.n_folds >= 2, "n_folds (>= 2)", self.n_folds),
            (0 <= self.fold < self.n_folds, f"fold (0 .. {self.n_folds - 1})", self.fold),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             "device (auto, cpu, cuda, cuda:N)", self.device),
            (self.amp in AMP, "amp", self.amp),
            (self.loader in LOADERS, "loader", self.loader),
            (self.workers >= 0, "workers", self.workers),
            (self.val_every >= 1, "val_every", self.val_every),
            (0.0 <= self.val_overlap < 1.0, "val_overlap", self.val_overlap),
            (self.loss_mode in ("regions", "classes"), "loss_mode", self.loss_mode),
        ]
        for ok, name, value in checks:
            if not ok:
                raise ConfigError(f"invalid {name}: {value!r}")

    @property
    def total_steps(self) -> int:
        return self.epochs * self.iters_per_epoch
