"""Offline stage: raw BraTS NIfTI case folders -> Zarr cache."""
