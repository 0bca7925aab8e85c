"""BraTS knowledge, in one place: editions and their file names, modalities, labels, regions, tasks.

Every other module imports these names instead of restating them.

Project-wide classes are contiguous: 0 background, 1 necrosis / non-enhancing
core (NCR), 2 oedema (ED), 3 enhancing tumour (ET), and, in BraTS 2024's
post-treatment gliomas, 4 resection cavity (RC). Raw files use 4 for ET in
BraTS 2018-2021, 3 since 2023, and 4 for RC since 2024; :attr:`Edition.label_map`
converts. Evaluation regions: whole tumour WT = {1, 2, 3}, tumour core
TC = {1, 3}, enhancing tumour ET = {3}, and RC = {4} where the labels have it
(:class:`LabelScheme`). The 2023-format tasks (GLI, MEN, MET, PED, SSA) share
these labels; they differ in how lesions are matched and which are too small to
count (:class:`Task`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import numpy as np

from pipeline.errors import CaseError, ConfigError

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


T = TypeVar("T")

#: Canonical channel order of every image array in the project.
MODALITIES: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")

BACKGROUND, NCR, ED, ET, RC = 0, 1, 2, 3, 4
NUM_CLASSES = 4  # without the resection cavity (BraTS 2018-2023); :class:`LabelScheme` for both
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
class LabelScheme:
    """The classes a network learns and the regions they are scored in.

    Attributes:
        name: ``"glioma"`` (NCR, ED, ET: BraTS 2018-2023, every 2023 task) or ``"glioma-rc"`` (those and the
            resection cavity of BraTS 2024's post-treatment gliomas).
        class_names: contiguous class -> name, background (0) left out.
        regions: region -> the classes it joins, in the order of the sigmoid outputs.
        paint: region channel -> the class it paints when region probabilities become classes, in painting
            order (each overwrites the previous).
    """

    name: str
    class_names: dict[int, str] = field(hash=False)
    regions: dict[str, tuple[int, ...]] = field(hash=False)
    paint: tuple[tuple[int, int], ...]

    @property
    def num_classes(self) -> int:
        """Classes with the background."""
        return 1 + len(self.class_names)

    def channels(self, mode: str) -> int:
        """Output channels of a network trained in loss mode ``mode`` ("regions" or "classes")."""
        return len(self.regions) if mode == "regions" else self.num_classes

    def channel_names(self, activation: str) -> list[str]:
        """Names of the probability channels of a sigmoid (regions) or softmax (classes) network."""
        return list(self.regions) if activation == "sigmoid" else ["background", *self.class_names.values()]

    def masks(self, label: np.ndarray) -> dict[str, np.ndarray]:
        """Boolean masks of the regions of a contiguous-class label map."""
        return {name: np.isin(label, classes) for name, classes in self.regions.items()}


GLIOMA = LabelScheme("glioma", dict(CLASS_NAMES), dict(REGIONS), REGION_PAINT)
#: BraTS 2024 post-treatment gliomas: the cavity is its own class and region, outside WT and TC; painted last
#: (a voxel the network calls cavity is no tumour).
GLIOMA_RC = LabelScheme("glioma-rc", {**CLASS_NAMES, RC: "RC"}, {**REGIONS, "RC": (RC,)}, (*REGION_PAINT, (3, RC)))
SCHEMES: dict[str, LabelScheme] = {s.name: s for s in (GLIOMA, GLIOMA_RC)}


def _named(table: Mapping[str, T], kind: str, name: str) -> T:
    """``table[name]``, or a ConfigError naming ``kind`` and the known names."""
    if name not in table:
        raise ConfigError(f"unknown {kind} {name!r}; known: {sorted(table)}")
    return table[name]


def scheme_named(name: str) -> LabelScheme:
    """The label scheme called ``name`` (ConfigError: no such scheme)."""
    return _named(SCHEMES, "label scheme", name)


@dataclass(frozen=True)
class Task:
    """A BraTS 2023-format task: how the organisers' lesion-wise metrics treat its lesions.

    Attributes:
        name: GLI (adult glioma), SSA (sub-Saharan Africa glioma), PED (paediatric), MEN (meningioma) or
            MET (brain metastases), as in the case ids (``BraTS-MEN-00004-000``).
        dilation: iterations of the 18-connected dilation that merge reference lesions and match predictions.
        min_volume_mm3: reference lesions of at most this volume are not scored.
    """

    name: str
    dilation: int
    min_volume_mm3: float


#: The parameters of the organisers' 2023 lesion-wise evaluation code, per task.
TASKS: dict[str, Task] = {t.name: t for t in (Task("GLI", 3, 50.0), Task("SSA", 3, 50.0), Task("PED", 3, 50.0),
                                              Task("MEN", 1, 50.0), Task("MET", 1, 2.0))}
_TASK_ID = re.compile(r"^BraTS-([A-Z]{3})-")


def task_of(case_id: str) -> Task:
    """The task a case id names (``BraTS-MET-00001-000`` -> MET); GLI for every other id (2018-2021 ids, own
    names), whose lesions the organisers score as gliomas."""
    match = _TASK_ID.match(case_id)
    return TASKS.get(match.group(1), TASKS["GLI"]) if match else TASKS["GLI"]


def task_named(name: str) -> Task:
    """The task called ``name``: GLI, SSA, PED, MEN or MET, in any case (ConfigError: no such task)."""
    return _named(TASKS, "task", name.upper())


@dataclass(frozen=True)
class Edition:
    """File naming and label set of one family of BraTS releases.

    Attributes:
        name: ``"brats2020"`` (2018–2021 naming), ``"brats2023"`` or ``"brats2024"`` (the 2023 naming with the
            resection cavity).
        separator: character between the case id and the modality in file names.
        suffixes: file-name modality for each canonical modality, in
            :data:`MODALITIES` order.
        labels: raw label values allowed in the segmentation.
        label_map: raw label -> contiguous class (0 bg, 1 NCR, 2 ED, 3 ET, 4 RC).
        scheme: the classes and regions its labels hold.
    """

    name: str
    separator: str
    suffixes: tuple[str, ...]
    labels: tuple[int, ...]
    label_map: dict[int, int] = field(hash=False)
    scheme: LabelScheme = GLIOMA


#: 2018-2021 (ET = 4), 2023 (ET = 3; GLI, SSA, PED, MEN, MET) and 2024 (the 2023 files with RC = 4). The
#: 2024 edition shares the 2023 file names: a glioma is read as 2024 when its label map holds a 4
#: (:func:`pipeline.nifti.read_case`), or when a flag says so.
EDITIONS: tuple[Edition, ...] = (
    Edition("brats2020", "_", ("flair", "t1", "t1ce", "t2"), (0, 1, 2, 4), {0: 0, 1: NCR, 2: ED, 4: ET}),
    Edition("brats2023", "-", ("t2f", "t1n", "t1c", "t2w"), (0, 1, 2, 3), {0: 0, 1: NCR, 2: ED, 3: ET}),
    Edition("brats2024", "-", ("t2f", "t1n", "t1c", "t2w"), (0, 1, 2, 3, 4), {0: 0, 1: NCR, 2: ED, 3: ET, 4: RC},
            GLIOMA_RC),
)
EDITION_BY_NAME = {e.name: e for e in EDITIONS}
#: The ``--edition`` choices: detected from the file names and labels, or one of :data:`EDITIONS`.
EDITION_CHOICES: tuple[str, ...] = ("auto", *EDITION_BY_NAME)


def edition_named(name: str) -> Edition:
    """The edition called ``name`` (ConfigError: no such edition)."""
    return _named(EDITION_BY_NAME, "edition", name)


def writable_map(label_map: dict[int, int], classes: set[int]) -> dict[int, int]:
    """``label_map`` (raw -> class), or the map of an edition that extends it to ``classes``: a 2023-format
    case's map with the resection cavity (2024's, RC = 4).

    Raises:
        ConfigError: no edition's labels hold ``classes`` beside ``label_map``'s (2018-2021 use 4 for ET, so a
            cavity cannot be written in their convention).
    """
    if classes <= set(label_map.values()):
        return label_map
    for edition in EDITIONS:
        if label_map.items() <= edition.label_map.items() and classes <= set(edition.label_map.values()):
            return edition.label_map
    names = [GLIOMA_RC.class_names.get(c, str(c)) for c in sorted(classes - set(label_map.values()))]
    raise ConfigError(f"classes {names} cannot be written in this case's labels {sorted(label_map)} (2018-2021 "
                      "labels use 4 for ET): give the case in the 2023 format")


def detected_edition(edition: Edition, case_id: str, reference: set[int]) -> Edition:
    """The edition a case is read in when none is asked for: its file names' (``edition``), or, for a
    glioma (``BraTS-GLI-…``, and ids of no task) whose 2023-format reference label map holds a 4, 2024's with
    the resection cavity. Other 2023 tasks keep their labels (a 4 there is reported: BraTS 2024's paediatric
    labels, for one, give 4 another meaning), and so does a prediction's 4 (never taken for a cavity unasked)."""
    return with_labels(edition, reference) if task_of(case_id).name == "GLI" else edition


def with_labels(edition: Edition, present: set[int]) -> Edition:
    """``edition``, or the edition of the same file names whose labels hold ``present`` (a 2023-format case
    with a 4 is a 2024 case); ``edition`` itself where none does (the caller reports the labels)."""
    if present <= set(edition.labels):
        return edition
    for other in EDITIONS:
        if other.suffixes == edition.suffixes and other.separator == edition.separator \
                and present <= set(other.labels):
            return other
    return edition


def region_masks(label: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean WT / TC / ET masks of a contiguous-class label map.

    Args:
        label: (X, Y, Z) integer classes 0..3.

    Returns:
        ``{"WT": mask, "TC": mask, "ET": mask}``, each (X, Y, Z) bool.
    """
    return {name: np.isin(label, classes) for name, classes in REGIONS.items()}
