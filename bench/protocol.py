"""The honest protocol: which data decides the design, which data reports it, and the projects simulated on each.

ZooLake's 35 classes are split once, by a fixed seed, into two disjoint halves of classes:

- **development** (17 classes, 170 images): every design decision (learner, mixture weights, calibration,
  grids, input size, test-time augmentation, backbones) is made on projects drawn from it alone
  (`bench/design.py`);
- **report** (18 classes, 180 images): `bench/quality.py` reports on projects drawn from it, and on the
  FlowCam proxy (2,100 particles, two shapes), which no decision saw either.

Projects of two shapes are drawn from a data set's images:

- `whole`: every image of the half, `fraction` of them annotated (5%, 10%, 20%; 40-80% for fine-tuning);
- `small`: what a new user's project looks like (the project behind issue 26 had 105 images of 6
  classes and 10-21 annotations): `classes` classes drawn per seed, up to `images` images of them, and
  `annotated` of those annotated at random, or one of each class first (as an annotator who looks for
  each class does) and the rest at random. ZooLake has 10 images a class, so 6 classes are 60 images and
  100 images are 10 classes; both are simulated.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SPLIT_SEED = 26  # fixed once, before any result was seen; changing it re-opens every design decision
DEVELOPMENT, REPORT = "development", "report"


def split_classes(classes: list[str], seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """ZooLake's classes in two disjoint halves; the report half gets the odd one."""
    order = np.random.default_rng(seed).permutation(sorted(classes))
    half = len(order) // 2
    return {DEVELOPMENT: sorted(order[:half].tolist()), REPORT: sorted(order[half:].tolist())}


@dataclasses.dataclass(frozen=True)
class Shape:
    """How a simulated project is drawn. `whole`: all images, `fraction` annotated. `small`: `classes`
    classes and at most `images` images of them, `annotated` annotated."""

    name: str
    fraction: float = 0.0
    classes: int = 0
    images: int = 0
    annotated: int = 0
    one_of_each: bool = False  # annotators label one task of each class first, then at random

    @property
    def label(self) -> str:
        if not self.classes:
            return f"{self.fraction:.0%}"
        how = ", one of each first" if self.one_of_each else ""
        return f"{self.classes} classes, {self.images} images, {self.annotated} annotated{how}"


def whole(fraction: float) -> Shape:
    return Shape("whole", fraction=fraction)


def small(classes: int, images: int, annotated: int, one_of_each: bool = False) -> Shape:
    return Shape("small", classes=classes, images=images, annotated=annotated, one_of_each=one_of_each)


@dataclasses.dataclass
class Project:
    rows: np.ndarray  # rows of the data set in the project
    annotated: np.ndarray  # positions into `rows`
    rest: np.ndarray  # positions into `rows`: the tasks scored


def draw(labels: list[str], shape: Shape, seed: int) -> Project:
    """One simulated project from the images whose labels are `labels` (a data set or one half of it)."""
    labels_arr = np.asarray(labels)
    key = [seed, round(shape.fraction * 1_000_000), shape.classes, shape.images, shape.annotated]
    rng = np.random.default_rng(key)
    if shape.classes:
        kinds = sorted(set(labels))
        chosen = rng.choice(len(kinds), min(shape.classes, len(kinds)), replace=False)
        pool = np.flatnonzero(np.isin(labels_arr, [kinds[i] for i in chosen]))
        rows = np.sort(rng.choice(pool, min(shape.images, len(pool)), replace=False))
        n_annotated = min(shape.annotated, len(rows) - 1)
    else:
        rows = np.arange(len(labels))
        n_annotated = int(min(len(rows) - 1, max(1, round(shape.fraction * len(rows)))))
    order = rng.permutation(len(rows))
    if shape.one_of_each:  # the first task of each class in the random order goes first
        first = {}
        for position in order:
            first.setdefault(labels[rows[position]], position)
        chosen = list(first.values())
        order = np.array(chosen + [p for p in order if p not in set(chosen)])
    return Project(rows, np.sort(order[:n_annotated]), np.sort(order[n_annotated:]))
