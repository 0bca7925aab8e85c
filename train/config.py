"""Training settings: one frozen dataclass, validated, serialised into the run dir and every checkpoint.

Fields left at ``None`` are filled from the *recipe* of the training device
(:data:`RECIPES`, see :func:`resolve`): with no preset, patch, batch or
optimiser flags, a CPU trains the project's CPU-budget recipe (96^3 patches
in bf16 where the CPU runs it natively, 64^3 in float32 elsewhere) and CUDA
the full ``brats`` recipe. The resolved config (no ``None`` left but
``time_budget``) is what a run stores.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass
from typing import Any

from pipeline.brats import LOSS_OUTPUT
from pipeline.cache.location import is_url
from pipeline.config import Config, setting
from pipeline.device import valid_device_name
from pipeline.errors import ConfigError
from pipeline.model import PRESETS
from pipeline.postprocess import PostProcessing
from train.augment.config import LEVELS

OPTIMIZERS = ("sgd", "adamw", "adam")
SCHEDULES = ("poly", "cosine")
AMP = ("none", "bf16", "fp16")
LOADERS = ("threads", "processes")
AUGMENT_LEVELS = tuple(LEVELS)  # owned by train.augment
LOSS_MODES = tuple(LOSS_OUTPUT)  # owned by pipeline.brats
#: The help texts' word for a setting the device's recipe fills in.
RECIPE = "default: the device's recipe"
ALL = "all"
#: Folds of the split when a run names none (as nnU-Net).
DEFAULT_FOLDS = 5

#: The defaults of each device, chosen by measurement (docs/benchmarks.md, "Quality on real cases").
RECIPES: dict[str, dict[str, Any]] = {
    # CPU: the recipe for a 35-minute budget on 2 cores; its cross-validated quality on the 17 real cases, and
    # the bf16 + channels-last step times it relies on: docs/benchmarks.md ("Quality on real cases").
    "cpu": dict(preset="small", patch_size=(96, 96, 96), batch_size=2, optimizer="adam", lr=3e-3,
                schedule="cosine", p_fg=0.5, augment="light", epochs=100, iters_per_epoch=50),
    # CPU without native bf16 (float32): the same with 64^3 patches. A float32 step of 96^3 takes about 7 s on
    # 2 cores, one of 64^3 about 1.2 s, so 35 minutes buy 1,500-1,700 steps instead of 292, and on the same held-out
    # cases that beats the 96^3 recipe by far (docs/benchmarks.md, "A recipe for CPUs without native bf16").
    "cpu-float32": dict(preset="small", patch_size=(64, 64, 64), batch_size=2, optimizer="adam", lr=3e-3,
                        schedule="cosine", p_fg=0.5, augment="light", epochs=100, iters_per_epoch=50),
    # CUDA: nnU-Net's 3d_fullres recipe for BraTS (1000 epochs x 250 steps, SGD 0.01, poly).
    "cuda": dict(preset="brats", patch_size=(128, 128, 128), batch_size=2, optimizer="sgd", lr=0.01,
                 schedule="poly", p_fg=0.33, augment="nnunet", epochs=1000, iters_per_epoch=250),
}

#: Post-processing a run of each recipe starts with (``RUN/postprocessing.json``): drop tumour components
#: more than 10 voxels from the largest, and make enhancing tumour more than 10 voxels from the largest ET
#: component necrosis, both guarded (skipped for a case where they would take away most of a region).
#: Chosen on the pooled, mirrored out-of-fold predictions of the CPU recipe's 3-fold cross-validation on the
#: 17 real cases at 35 minutes; each fold's own choice, made on the other folds only, helped 14 of 17 cases
#: and hurt none (docs/benchmarks.md, "Quality on real cases"). The float32 CPU recipe keeps the largest
#: tumour component (guarded), the pooled choice of its own 3-fold cross-validation, made the same way (each
#: fold's choice on the other folds helped 16 of 17 cases and hurt one, by 0.039: docs/benchmarks.md, "A
#: recipe for CPUs without native bf16"). The CUDA recipe starts from the bf16 CPU rule until its own folds
#: choose; ``python -m train.postprocess`` replaces it with a choice made on a user's own folds.
RECIPE_POSTPROCESSING: dict[str, PostProcessing] = {
    "cpu": PostProcessing(max_distance=10, et_max_distance=10),
    "cpu-float32": PostProcessing(keep_largest=True),
    "cuda": PostProcessing(max_distance=10, et_max_distance=10),
}


def recipe_name(device_type: str, cpu_bf16: bool) -> str:
    """The recipe a device trains by default: "cuda"; "cpu" on a CPU with native bf16 (AMX or AVX512-BF16,
    :func:`pipeline.device.cpu_bf16`), where it trains in bf16; else "cpu-float32". The hardware decides, not
    ``--amp``: a flag changes its own setting only."""
    if device_type == "cuda":
        return "cuda"
    return "cpu" if cpu_bf16 else "cpu-float32"


@dataclass(frozen=True)
class TrainConfig(Config):
    """Every knob of a training run; CLI flags map 1:1 onto these fields.

    Data: ``cache_dir`` (a keyed cache), ``patch_size`` (voxels per axis),
    ``batch_size``, ``p_fg`` (share of tumour-centred patches), ``fold`` of
    ``n_folds`` (validation split by case id; ``"all"``: every labelled case
    trains, no validation, as nnU-Net's ``all``), ``augment`` (a level of
    :data:`train.augment.LEVELS`: none, light, nnunet, brats2020; run on the
    training device).
    Model: ``preset``, ``loss_mode`` ("regions": sigmoid WT/TC/ET, Dice+BCE;
    "classes": softmax, Dice+CE), ``deep_supervision`` (None: the preset's).
    Optimisation: ``optimizer`` ("sgd": Nesterov, momentum 0.99 as nnU-Net;
    "adam", "adamw"), ``lr``, ``weight_decay``, ``schedule`` ("poly",
    exponent 0.9, or "cosine") over ``epochs`` x ``iters_per_epoch`` steps or,
    with ``time_budget`` (minutes), over the elapsed share of the budget,
    whichever is further; ``ema``, the decay of a moving average of the
    weights kept beside them (:mod:`train.ema`; 0: none); ``amp`` (bf16 on
    CUDA, and on CPUs with bf16 support), ``compile``, ``channels_last``.
    Data parallelism (under torchrun, see train/distributed.py): ``batch_size``
    is per rank; ``sync_bn`` synchronises batch-norm statistics across CUDA
    ranks (presets with batch norm); ``dist_timeout`` (minutes) bounds every
    collective, so a dead rank ends the job instead of hanging it.
    Loading: ``loader`` ("threads": a thread pool in the training process;
    "processes": a torch DataLoader), ``workers``.
    Validation: every ``val_every`` epochs, sliding window with ``val_overlap``
    on at most ``max_val_cases`` held-out cases (0: all).
    ``None`` means "the device's recipe" (see :func:`resolve`).
    """

    cache_dir: str = setting(
        MISSING,
        'keyed cache directory, or a cache root holding exactly one cache (a folder, or an fsspec URL such as'
        ' s3://bucket/prefix)')
    run_dir: str = setting(MISSING, 'where checkpoints, TensorBoard logs and the run record go')
    preset: str | None = setting(
        None,
        f"model preset: seed (the write-up's U-Net), small (the CPU-budget recipe's), small-resenc (small's "
        f"widths with a residual encoder, as nnU-Net's ResEnc), medium (16-256 channels), brats (GPU, "
        f'nnU-Net-sized); {RECIPE}', choices=PRESETS)
    loss_mode: str = setting(
        "regions",
        'regions (sigmoid WT/TC/ET, Dice+BCE, as nnU-Net for BraTS) or classes (softmax, Dice+CE)', choices=LOSS_MODES)
    batch_dice: bool = setting(
        False, "pool the Dice counts of the batch's patches (one Dice per region and batch, as nnU-Net's 3d_fullres "
        "trains) instead of averaging a Dice per patch, where a patch without a region's voxels is penalised for "
        "any voxel predicted there")
    squared_dice: bool = setting(
        False, "square the predicted probabilities in the Dice denominator (2 tp / (sum p^2 + sum t), V-Net's "
        "form), which penalises unsure voxels less than the plain soft Dice does")
    region_weights: tuple[float, ...] = setting(
        (), "one loss weight per region (WT TC ET; per tumour class NCR ED ET with --loss-mode classes; one more "
        "with the resection cavity) in both the Dice mean and the (B)CE, normalised to mean 1; default: all equal",
        metavar="W")
    deep_supervision: bool | None = setting(None, "true/false; default: the preset's")
    patch_size: tuple[int, int, int] | None = setting(None, f'patch size in voxels per axis; {RECIPE}')
    batch_size: int | None = setting(None, f'patches per step (per rank under torchrun); {RECIPE}')
    epochs: int | None = setting(None, f'epochs (a checkpoint after each); {RECIPE}')
    iters_per_epoch: int | None = setting(None, f'optimisation steps per epoch; {RECIPE}')
    time_budget: float | None = setting(
        None,
        'stop training when this many minutes are spent (the clock is checked before each step; validation '
        'and checkpoints count against it) and run the learning-rate schedule over the elapsed share of the '
        'budget; --resume continues the same budget')
    optimizer: str | None = setting(
        None,
        f'sgd (Nesterov, momentum 0.99), adam or adamw; {RECIPE}', choices=OPTIMIZERS)
    lr: float | None = setting(None, f'initial learning rate; {RECIPE}')
    schedule: str | None = setting(
        None,
        f'learning-rate decay to 0 over the steps (or the time budget): poly (exponent 0.9) or cosine; '
        f'{RECIPE}', choices=SCHEDULES)
    weight_decay: float = setting(3e-5, 'weight decay')
    ema: float = setting(
        0.0, 'keep an exponential moving average of the weights with this decay (e.g. 0.995; 0: none), stored in '
        'the checkpoints beside the weights; prediction uses it with --weights ema. It trains nothing: the '
        'weights are the same with it or without it', metavar="DECAY")
    p_fg: float | None = setting(None, f'share of patches centred on a tumour voxel; {RECIPE}')
    augment: str | None = setting(
        None,
        f'augmentation level, run batched on the training device: none; light (mirroring, intensity '
        f"scale/shift, noise); nnunet (nnU-Net v2's default transforms: rotation, scaling, noise, blur, "
        f'brightness, contrast, low resolution, gamma, mirroring; rotated or scaled patches are cut from a '
        f"region read larger than the patch); brats2020 (nnU-Net's BraTS 2020 DA4); {RECIPE}", choices=AUGMENT_LEVELS)
    fold: int | str = setting(
        0,
        "validation fold, 0 .. n-folds - 1 (k-fold split by case id), or 'all': train on every labelled case,"
        ' no validation; the final weights (last.pt) are the model')
    n_folds: int | None = setting(None, 'number of folds of the split (default 5; not with --fold all)')
    seed: int = setting(0, 'seed of patches, augmentation and initial weights')
    device: str = setting("auto", 'auto (CUDA if present), cpu, cuda, cuda:N')
    amp: str | None = setting(
        None,
        'autocast: bf16, fp16 (CUDA only, with a grad scaler) or none; default: bf16 on CUDA and on CPUs with'
        ' native bf16 (AMX/AVX512-BF16), else none', choices=AMP)
    compile: bool | None = setting(
        None,
        'torch.compile the training step; default: on with CUDA (compiling takes seconds, then the step runs '
        'faster: docs/benchmarks.md, GPU), off on a CPU')
    channels_last: bool | None = setting(None, 'channels-last-3d memory format; default: on on a CPU, off on CUDA')
    sync_bn: bool = setting(
        False,
        'under torchrun on CUDA: synchronise batch-norm statistics across ranks (SyncBatchNorm; presets with '
        'batch norm only)', switch=False)
    dist_timeout: float = setting(
        10.0,
        'under torchrun: minutes any collective waits for the other ranks before the job fails (a rank that '
        'died or hangs ends the job with an error, not a hang)')
    loader: str = setting(
        "threads",
        'threads (thread pool in this process) or processes (torch DataLoader workers)', choices=LOADERS)
    workers: int = setting(2, 'loader threads or processes')
    val_every: int = setting(1, 'validate every N epochs')
    val_overlap: float = setting(0.5, 'overlap of sliding windows at validation')
    max_val_cases: int = setting(0, 'validate on at most N held-out cases (0: all)')

    def __post_init__(self) -> None:
        if self.patch_size is not None:
            object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if isinstance(self.region_weights, (list, tuple)):
            object.__setattr__(self, "region_weights", tuple(self.region_weights))
        fold = self.fold
        if isinstance(fold, str) and fold != ALL:
            if not fold.isdigit():
                raise ConfigError(f"invalid fold: {fold!r} (a fold number or 'all')")
            object.__setattr__(self, "fold", int(fold))
        if self.fold == ALL and self.n_folds is not None:
            raise ConfigError(f"--fold all trains on every case; it takes no --n-folds (got {self.n_folds})")
        n_folds = DEFAULT_FOLDS if self.n_folds is None else self.n_folds
        checks = [
            (self.patch_size is None or (len(self.patch_size) == 3 and min(self.patch_size) >= 8),
             "patch_size", self.patch_size),
            (self.batch_size is None or self.batch_size >= 1, "batch_size", self.batch_size),
            (self.epochs is None or self.epochs >= 1, "epochs", self.epochs),
            (self.iters_per_epoch is None or self.iters_per_epoch >= 1, "iters_per_epoch", self.iters_per_epoch),
            (self.time_budget is None or self.time_budget > 0, "time_budget (minutes, > 0)", self.time_budget),
            (self.optimizer is None or self.optimizer in OPTIMIZERS, "optimizer", self.optimizer),
            (self.schedule is None or self.schedule in SCHEDULES, "schedule", self.schedule),
            (self.lr is None or self.lr > 0, "lr", self.lr),
            (self.p_fg is None or 0.0 <= self.p_fg <= 1.0, "p_fg", self.p_fg),
            (n_folds >= 2, "n_folds (>= 2)", self.n_folds),
            (self.fold == ALL or 0 <= int(self.fold) < n_folds, f"fold (0 .. {n_folds - 1} or 'all')", self.fold),
            (valid_device_name(self.device),
             "device (auto, cpu, cuda, cuda:N)", self.device),
            (self.amp is None or self.amp in AMP, "amp", self.amp),
            (self.loader in LOADERS, "loader", self.loader),
            (self.workers >= 0, "workers", self.workers),
            (self.dist_timeout > 0, "dist_timeout (minutes, > 0)", self.dist_timeout),
            (not is_url(self.run_dir), "run_dir (a local folder: only the cache may be a URL)", self.run_dir),
            (0.0 <= self.ema < 1.0, "ema (a decay in [0, 1), 0: none)", self.ema),
            (self.val_every >= 1, "val_every", self.val_every),
            (0.0 <= self.val_overlap < 1.0, "val_overlap", self.val_overlap),
            (self.loss_mode in LOSS_MODES, "loss_mode", self.loss_mode),
            (self.augment is None or self.augment in AUGMENT_LEVELS, f"augment (one of {AUGMENT_LEVELS})",
             self.augment),
        ]
        for ok, name, value in checks:
            if not ok:
                raise ConfigError(f"invalid {name}: {value!r}")


@dataclass(frozen=True)
class RunConfig(Config):
    """A :class:`TrainConfig` after :func:`resolve`: the same fields in the same order, every recipe value
    filled in, so a run reads its settings without a fallback. Three stay optional because ``None`` has a
    meaning of its own there: ``deep_supervision`` (the preset's choice), ``time_budget`` (no budget) and
    ``n_folds`` (a ``--fold all`` run has no folds). Its :meth:`to_dict` is what a run stores."""

    cache_dir: str
    run_dir: str
    preset: str
    loss_mode: str
    batch_dice: bool
    squared_dice: bool
    region_weights: tuple[float, ...]
    deep_supervision: bool | None
    patch_size: tuple[int, int, int]
    batch_size: int
    epochs: int
    iters_per_epoch: int
    time_budget: float | None
    optimizer: str
    lr: float
    schedule: str
    weight_decay: float
    ema: float
    p_fg: float
    augment: str
    fold: int | str
    n_folds: int | None
    seed: int
    device: str
    amp: str
    compile: bool
    channels_last: bool
    sync_bn: bool
    dist_timeout: float
    loader: str
    workers: int
    val_every: int
    val_overlap: float
    max_val_cases: int

    @property
    def total_steps(self) -> int:
        return self.epochs * self.iters_per_epoch


def resolve(cfg: TrainConfig, device_type: str, cpu_bf16: bool) -> RunConfig:
    """Fill every ``None`` from the recipe of ``device_type`` ("cpu" or "cuda").

    Args:
        cfg: as given by the user.
        device_type: where the run trains.
        cpu_bf16: whether this CPU runs bf16 convolutions natively (AMX or
            AVX512-BF16); decides the CPU recipe ("cpu" or "cpu-float32") and ``amp``.

    Raises:
        ConfigError: fp16 autocast asked for on a CPU.
    """
    recipe = RECIPES[recipe_name(device_type, cpu_bf16)]
    fill = {k: v for k, v in recipe.items() if getattr(cfg, k) is None}
    if cfg.time_budget is not None and cfg.epochs is None:
        fill["epochs"] = 1_000_000  # the budget, not a step count, ends the run
    if cfg.amp is None:
        fill["amp"] = "bf16" if device_type == "cuda" or cpu_bf16 else "none"
    if cfg.channels_last is None:  # faster on a CPU in bf16 and in float32 alike (docs/benchmarks.md)
        fill["channels_last"] = device_type != "cuda"
    if cfg.compile is None:  # compiled, the CUDA step runs faster (docs/benchmarks.md, "GPU")
        fill["compile"] = device_type == "cuda"
    if cfg.n_folds is None and cfg.fold != ALL:
        fill["n_folds"] = DEFAULT_FOLDS
    out = dataclasses.replace(cfg, **fill)
    if device_type != "cuda" and out.amp == "fp16":
        raise ConfigError("amp fp16 needs CUDA; on a CPU use bf16 or none")
    values = {f.name: getattr(out, f.name) for f in dataclasses.fields(TrainConfig)}
    unset = [k for k, v in values.items() if v is None and k not in ("deep_supervision", "time_budget", "n_folds")]
    if unset:  # a recipe that lacks a setting: a bug of the recipe table, not of the user's flags
        raise ConfigError(f"the {recipe_name(device_type, cpu_bf16)} recipe leaves {unset} unset")
    return RunConfig(**values)
