"""Shared library of the BraTS pipeline: raw-data reading, preprocessing
transforms, the on-disk Zarr cache format, patch sampling, models, losses,
metrics and sliding-window inference."""
