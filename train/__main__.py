"""``python -m train --cache-dir CACHE --run-dir RUN``: train a 3D U-Net on a Zarr cache (see :mod:`train.cli`)."""

import sys

from train.cli import main

if __name__ == "__main__":
    sys.exit(main())
