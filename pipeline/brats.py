"""BraTS knowledge, in one place: editions and their file names, modalities, labels, regions.

Every other module imports these names instead of restating them.

Project-wide classes are contiguous: 0 background, 1 necrosis / non-enhancing
core (NCR), 2 oedema (ED), 3 enhancing tumour (ET). Raw files use 4 for ET in
BraTS 2018-2021 and 3 in BraTS 2023; :attr:`Edition.label_map` converts.
Evaluation regions: whole tumour WT = {1, 2, 3}, tumour core TC = {1, 3},
enhancing tumour ET = {3}.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from pipeline.errors import CaseError

#: What a case id (or a run id) may be: a name, never a path. Letters, digits, "_", "-" and "." (no
#: ".."), starting with a letter or digit, at most 128 characters; every BraTS edition's ids fit.
CASE_ID = re.compile(r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def check_case_id(case_id: object, where: str | None = None, what: str = "case id") -> str:
    """``case_id`` if it is a name (:data:`CASE_ID`), else a CaseError naming where it came from."""
    if isinstance(case_id, str) and CASE_ID.match(case_id):
        return case_id
    shown = repr(case_id)[:80]
    raise CaseError(shown, where, f"{what} is not a name (letters, digits, '_', '-', '.', no '..', starting with a "
                                  "letter or digit): refused, it could name a path")


#: Canonical channel order of every image array in the project.
MODALITIES: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")

BACKGROUND, NCR, ED, ET = 0, 1, 2, 3
NUM_CLASSES = 4
CLASS_NAMES: dict[int, str] = {NCR: "NCR", ED: "ED", ET: "ET"}

#: Region name -> the classes it joins, in the order of the sigmoid outputs (WT, TC, ET).
REGIONS: dict[str, tuple[int, ...]] = {"WT": (NCR, ED, ET), "TC": (NCR, ET), "ET": (ET,)}
#: Region channel -> the class it paints when turning region probabilities into classes, in
#: painting order (each overwrites the previous): WT -> ED, then TC -> NCR, then ET -> ET.
REGION_PAINT: tuple[tuple[int, int], ...] = ((0, ED), (1, NCR), (2, ET))

#: The output activation of a network: sigmoid regions or softmax classes.
Activation = Literal["sigmoid", "softmax"]
#: Loss modes and the output activation each trains.
LOSS_OUTPUT: dict[str, Activation] = {"regions": "sigmoid", "classes": "softmax"}
#: Output channels per loss mode.
LOSS_CHANNELS: dict[str, int] = {"regions": len(REGIONS), "classes": NUM_CLASSES}
#: Names of the probability channels per activation.
CHANNEL_NAMES: dict[str, list[str]] = {"sigmoid": list(REGIONS), "softmax": ["background", "NCR", "ED", "ET"]}


@dataclass(frozen=True)
class Edition:
    """File naming and label set of one family of BraTS releases.

    Attributes:
        name: ``"brats2020"`` (2018–2021 naming) or ``"brats2023"``.
        separator: character between the case id and the modality in file names.
        suffixes: file-name modality for each canonical modality, in
            :data:`MODALITIES` order.
        labels: raw label values allowed in the segmentation.
        label_map: raw label -> contiguous class (0 bg, 1 NCR, 2 ED, 3 ET).
    """

    name: str
    separator: str
    suffixes: tuple[str, ...]
    labels: tuple[int, ...]
    label_map: dict[int, int] = field(hash=False)


EDITIONS: tuple[Edition, ...] = (
    Edition("brats2020", "_", ("flair", "t1", "t1ce", "t2"), (0, 1, 2, 4), {0: 0, 1: NCR, 2: ED, 4: ET}),
    Edition("brats2023", "-", ("t2f", "t1n", "t1c", "t2w"), (0, 1, 2, 3), {0: 0, 1: NCR, 2: ED, 3: ET}),
)
EDITION_BY_NAME = {e.name: e for e in EDITIONS}


def region_masks(label: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean WT / TC / ET masks of a contiguous-class label map.

    Args:
        label: (X, Y, Z) integer classes 0..3.

    Returns:
        ``{"WT": mask, "TC": mask, "ET": mask}``, each (X, Y, Z) bool.
    """
    return {name: np.isin(label, classes) for name, classes in REGIONS.items()}
