"""Training augmentation at nnU-Net strength, on the training device.

Named levels (:data:`LEVELS`, ``--augment``):

* ``none``: the identity.
* ``light``: mirroring on all axes, intensity scale/shift (x U(0.9, 1.1) +
  U(-0.1, 0.1) per channel) and Gaussian noise (p 0.15); no spatial transform.
* ``nnunet``: nnU-Net v2's default training transforms with their
  probabilities and ranges (``nnUNetTrainer.get_training_transforms``):
  rotation ±30° per axis (p 0.2), scaling 0.7–1.4 (p 0.2), Gaussian noise
  (variance 0–0.1, p 0.1), Gaussian blur (sigma 0.5–1 per axis, p 0.2, each
  channel p 0.5), multiplicative brightness 0.75–1.25 (p 0.15), contrast
  0.75–1.25 keeping the range (p 0.15), simulated low resolution (zoom
  0.5–1, p 0.25, each channel p 0.5), inverted gamma (p 0.1) and gamma
  (p 0.3), 0.7–1.5, keeping mean and std; mirroring on all axes.
* ``brats2020``: nnU-Net's BraTS 2020 "DA4" (Isensee et al. 2020): rotation
  and scaling at p 0.3, scaling 0.65–1.6 drawn per axis, elastic deformation
  (p 0.3), additive brightness (p 0.3), gamma 0.5–1.6.

At the end the brain mask is applied again (after a spatial transform, the
mask resampled by nearest neighbour, as nnU-Net masks with its resampled
segmentation), so outside the brain stays exactly 0, as the z-scored cache
stores it.

Randomness: the spatial parameters of sample ``k`` come from
``np.random.default_rng([seed, k, SPATIAL_STREAM])`` in the loader, which
must know them to read the region they need (:func:`spatial_draw`,
:func:`region_for`); everything else is drawn from the sample's own
``torch.Generator`` (:func:`sample_generators`, seeded by ``[seed, k,
INTENSITY_STREAM]``). A sample's augmentation therefore depends on nothing
but the seed and its number: a run is the same on any worker count, on any
number of data-parallel ranks sharing a global batch, and exact on resume.
Only the samples drawn for a transform pay for it.

Modules: :mod:`~train.augment.config` (the levels), :mod:`~train.augment.spatial`,
:mod:`~train.augment.intensity`, :mod:`~train.augment.batch` (:func:`augment_batch`);
``python -m train.augment`` (:mod:`~train.augment.__main__`) writes augmented patches to look at.
"""

from train.augment.batch import augment_batch, mirror_draw
from train.augment.config import INTENSITY_STREAM, LEVELS, NNUNET, SPATIAL_STREAM, AugmentConfig, augment_level
from train.augment.intensity import intensity, sample_generators
from train.augment.spatial import brain_of, region_for, rotation_matrix, spatial_draw, warp_region

__all__ = [
    "INTENSITY_STREAM",
    "LEVELS",
    "NNUNET",
    "SPATIAL_STREAM",
    "AugmentConfig",
    "augment_batch",
    "augment_level",
    "brain_of",
    "intensity",
    "mirror_draw",
    "region_for",
    "rotation_matrix",
    "sample_generators",
    "spatial_draw",
    "warp_region",
]
