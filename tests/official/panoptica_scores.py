"""Run by the official BraTS evaluation package's own interpreter (``.venv-official``): score prediction /
reference NIfTI pairs with its bundled glioma config and print the global metrics as JSON.

Usage: ``python panoptica_scores.py PRED_1 REF_1 [PRED_2 REF_2 ...]``; prints
``[{"wt": {"dsc": ..., "hd95": ...}, "tc": ..., "et": ...}, ...]`` in the order of the pairs.
Imports nothing of this project: it must run where only the official package is installed.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
from importlib.resources import files


def main(argv: list[str]) -> int:
    with contextlib.redirect_stdout(io.StringIO()):  # panoptica prints a banner
        from panoptica import Panoptica_Evaluator

        config = str(files("brats_evaluation").joinpath("configs", "config_gli.yaml"))
        evaluator = Panoptica_Evaluator.load_from_config(config)
        out = []
        for pred, ref in zip(argv[0::2], argv[1::2]):
            result = evaluator.evaluate(pred, ref)
            row = {}
            for group in ("wt", "tc", "et"):
                d = result[group].to_dict(True)
                row[group] = {k: (None if not math.isfinite(float(d[f"global_bin_{k}"])) else float(d[f"global_bin_{k}"]))
                              for k in ("dsc", "hd95")}
            out.append(row)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
