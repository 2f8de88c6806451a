"""One learner per `Choices` tag, fitted on the project's annotations and all of its tasks.

A single-choice tag is one classification problem over the labels annotated so far; a multiple-choice tag
is one present/absent problem per label. Each problem averages two answers (worker/learning.py): a ridge
regression on the embeddings, and labels spread over the neighbour graph of the project's tasks, whose
hyper-parameters are all chosen inside the fit by exact leave-one-out on the annotated tasks. The score
of what is predicted is the probability that it is right: a Platt map fitted on the leave-one-out
predictions, whose mean over the tasks nobody annotated stays near the leave-one-out accuracy (never above
it with fewer than 20 annotations; `learning.platt_fit`).

A problem needs two labels annotated (for a multiple-choice label: tasks with it and tasks without it);
a tag with no such problem has no learner, and the project's clusters answer for it (project_model.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from worker.learning import (
    MAX_LOO,
    Ridge,
    RidgeBasis,
    Spread,
    SpreadBasis,
    agreement,
    fit_temperature,
    induce,
    platt_apply,
    platt_fit,
    ridge_basis,
    ridge_fit,
    softmax,
    spread_basis,
    spread_fit,
)

Choice = tuple[list[str], float]
LINEAR_WEIGHT = 0.5  # the mixture: half ridge, half spread labels (bench/RESULTS.md)

__all__ = ["Choice", "Neighbours", "Problem", "TagLearner", "agreement", "fit_tag"]


@dataclass
class Neighbours:
    """Tasks to predict, in the learner's terms: their full features, and their nearest anchors (most
    similar first, as many as the largest k any problem uses)."""

    full: np.ndarray
    idx: np.ndarray
    sim: np.ndarray


@dataclass
class Problem:
    classes: list[str]  # single choice: the labels; multiple: [label] (present / absent)
    ridge: Ridge
    temperature: float
    spread: Spread | None
    platt: tuple[float, float]
    loo_accuracy: float

    def probabilities(self, x: Neighbours) -> np.ndarray:
        """(n, C): for a present/absent problem C is 2, column 1 meaning present."""
        linear = softmax((x.full @ self.ridge.weight + self.ridge.bias) / self.temperature)
        if self.spread is None or not len(x.idx):
            return linear
        k = self.spread.k
        graph = induce(self.spread.labels, x.idx[:, :k], x.sim[:, :k])
        return LINEAR_WEIGHT * linear + (1 - LINEAR_WEIGHT) * graph

    def scores(self, p: np.ndarray) -> np.ndarray:
        """Calibrated probability that the most probable class is right, per row."""
        return platt_apply(p.max(axis=1), *self.platt)

    # -- persistence ---------------------------------------------------------------------------------

    def to_meta(self, arrays: dict[str, np.ndarray], prefix: str) -> dict[str, Any]:
        arrays[prefix + "w"] = self.ridge.weight.astype(np.float32)
        arrays[prefix + "b"] = self.ridge.bias.astype(np.float32)
        if self.spread is not None:
            arrays[prefix + "spread"] = self.spread.labels.astype(np.float16)
        return {
            "classes": self.classes,
            "ridge_strength": self.ridge.strength,
            "temperature": self.temperature,
            "spread": None if self.spread is None else {"k": self.spread.k, "alpha": self.spread.alpha},
            "platt": list(self.platt),
            "loo_accuracy": self.loo_accuracy,
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray], prefix: str) -> Problem:
        spread = meta.get("spread")
        return cls(
            classes=list(meta["classes"]),
            ridge=Ridge(arrays[prefix + "w"], arrays[prefix + "b"], float(meta["ridge_strength"])),
            temperature=float(meta["temperature"]),
            spread=None
            if spread is None
            else Spread(arrays[prefix + "spread"], int(spread["k"]), float(spread["alpha"])),
            platt=(float(meta["platt"][0]), float(meta["platt"][1])),
            loo_accuracy=float(meta["loo_accuracy"]),
        )


@dataclass
class TagLearner:
    tag: str
    multiple: bool
    problems: list[Problem]
    # multiple choice: labels every annotated task had (present: True), with their score (n+1)/(n+2)
    constant: dict[str, tuple[bool, float]] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    def predict(self, x: Neighbours) -> list[Choice | None]:
        n = len(x.full)
        if not self.multiple:
            (problem,) = self.problems
            p = problem.probabilities(x)
            best = p.argmax(axis=1)
            scores = problem.scores(p)
            return [([problem.classes[int(c)]], round(float(s), 4)) for c, s in zip(best, scores, strict=True)]
        chosen: list[list[str]] = [[] for _ in range(n)]
        score = np.ones(n)
        for problem in self.problems:
            p = problem.probabilities(x)
            right = problem.scores(p)
            present = p[:, 1] > p[:, 0]
            score *= right
            for i in np.flatnonzero(present):
                chosen[i].append(problem.classes[0])
        for label, (present, s) in self.constant.items():
            score *= s
            if present:
                for labels in chosen:
                    labels.append(label)
        return [(labels, round(float(s), 4)) if labels else None for labels, s in zip(chosen, score, strict=True)]

    def to_meta(self, arrays: dict[str, np.ndarray], prefix: str) -> dict[str, Any]:
        return {
            "tag": self.tag,
            "multiple": self.multiple,
            "problems": [p.to_meta(arrays, f"{prefix}{i}/") for i, p in enumerate(self.problems)],
            "constant": {k: [bool(v[0]), float(v[1])] for k, v in self.constant.items()},
            "stats": self.stats,
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray], prefix: str) -> TagLearner:
        return cls(
            tag=meta["tag"],
            multiple=bool(meta["multiple"]),
            problems=[Problem.from_meta(p, arrays, f"{prefix}{i}/") for i, p in enumerate(meta["problems"])],
            constant={k: (bool(v[0]), float(v[1])) for k, v in meta.get("constant", {}).items()},
            stats=dict(meta.get("stats", {})),
        )


@dataclass
class _Shared:
    """Per tag: the decompositions every problem of the tag reuses, and the tasks nobody annotated for it
    (a sample: the anchors), whose scores calibration matches to the held-out accuracy."""

    ridge: RidgeBasis
    spread: SpreadBasis | None
    in_graph: np.ndarray  # positions (into the annotated tasks) of those in the graph
    unlabelled: Neighbours | None


def _shared(
    x: np.ndarray, anchors: np.ndarray, graphs: dict[int, sp.csr_matrix], seed: int, unlabelled: Neighbours | None
) -> _Shared:
    in_graph = np.flatnonzero(anchors >= 0)
    spread = None
    if len(in_graph) and graphs:
        rng = np.random.default_rng(seed)
        if len(in_graph) > MAX_LOO:
            loo_rows = np.sort(rng.choice(len(in_graph), MAX_LOO, replace=False))
        else:
            loo_rows = np.arange(len(in_graph))
        spread = spread_basis(graphs, anchors[in_graph], loo_rows)
    return _Shared(ridge_basis(x), spread, in_graph, unlabelled)


def _fit_problem(classes: list[str], y: np.ndarray, shared: _Shared) -> tuple[Problem, np.ndarray, np.ndarray]:
    """`y`: class index per annotated task. Returns the problem, and the leave-one-out probabilities of
    the annotated tasks (positions into y) they were computed for."""
    c = len(classes) if len(classes) > 1 else 2
    ridge, ridge_loo = ridge_fit(shared.ridge, y, c)
    temperature = fit_temperature(ridge_loo, y)
    loo = softmax(ridge_loo / temperature)
    rows = np.arange(len(y))
    spread = None
    if shared.spread is not None:
        spread, graph_loo = spread_fit(shared.spread, y[shared.in_graph], c)
        rows = shared.in_graph[shared.spread.loo_rows]
        loo = LINEAR_WEIGHT * loo[rows] + (1 - LINEAR_WEIGHT) * graph_loo
    correct = loo.argmax(axis=1) == y[rows]
    problem = Problem(classes, ridge, temperature, spread, (0.0, 0.0), float(correct.mean()))
    unlabelled = None if shared.unlabelled is None else problem.probabilities(shared.unlabelled).max(axis=1)
    problem.platt = platt_fit(loo.max(axis=1), correct, unlabelled)
    return problem, rows, loo


def fit_tag(
    tag: str,
    multiple: bool,
    all_labels: Sequence[str],
    annotated: Sequence[tuple[int, list[str]]],
    full: np.ndarray,
    anchor_of: np.ndarray,
    graphs: dict[int, sp.csr_matrix],
    seed: int = 0,
    anchor_neighbours: Neighbours | None = None,
) -> TagLearner | None:
    """`annotated`: (row into `full`, labels chosen) per annotated task; `anchor_of`: anchor index per row
    of `full` (-1: not an anchor); `anchor_neighbours`: the anchors as tasks to predict (calibration uses
    those not annotated for this tag). None when the annotations hold no two labels to tell apart."""
    rows = np.array([r for r, _ in annotated], int)
    x, anchors = full[rows], anchor_of[rows]
    unlabelled = None
    if anchor_neighbours is not None:
        keep = np.ones(len(anchor_neighbours.full), bool)
        keep[anchors[anchors >= 0]] = False
        if keep.any():
            a = anchor_neighbours
            unlabelled = Neighbours(a.full[keep], a.idx[keep], a.sim[keep])
    n = len(rows)
    if not multiple:
        labels = [chosen[0] for _, chosen in annotated]
        classes = sorted(set(labels))
        if len(classes) < 2:
            return None
        y = np.array([classes.index(label) for label in labels])
        problem, loo_rows, loo = _fit_problem(classes, y, _shared(x, anchors, graphs, seed, unlabelled))
        predicted = [classes[i] for i in loo.argmax(axis=1)]
        stats = {
            "annotated": n,
            "labels": {str(k): v for k, v in Counter(labels).items()},
            "cv_accuracy": round(agreement(predicted, [labels[i] for i in loo_rows], False), 4),
            "cv_tasks": len(loo_rows),
            "ridge_strength": problem.ridge.strength,
            "spread": None if problem.spread is None else {"k": problem.spread.k, "alpha": problem.spread.alpha},
        }
        return TagLearner(tag, False, [problem], {}, stats)

    sets = [set(chosen) for _, chosen in annotated]
    problems: list[Problem] = []
    constant: dict[str, tuple[bool, float]] = {}
    loo_sets: dict[int, set[str]] = {}
    shared: _Shared | None = None
    for label in all_labels:
        y = np.array([label in s for s in sets], int)
        positives = int(y.sum())
        if positives == 0:
            continue  # never annotated: never predicted
        if positives == n:  # on every annotated task so far (rule of succession for its score)
            constant[label] = (True, (n + 1) / (n + 2))
            continue
        shared = shared or _shared(x, anchors, graphs, seed, unlabelled)
        problem, loo_rows, loo = _fit_problem([label], y, shared)
        problems.append(problem)
        for r, present in zip(loo_rows, loo[:, 1] > loo[:, 0], strict=True):
            loo_sets.setdefault(int(r), set())
            if present:
                loo_sets[int(r)].add(label)
    if not problems:
        return None
    held = sorted(loo_sets)
    predicted = [sorted(loo_sets[r] | {k for k, v in constant.items() if v[0]}) for r in held]
    stats = {
        "annotated": n,
        "labels": {str(k): v for k, v in Counter(label for s in sets for label in s).items()},
        "cv_accuracy": round(agreement(predicted, [sorted(sets[r]) for r in held], True), 4),
        "cv_tasks": len(held),
        "per_label_cv_accuracy": {p.classes[0]: round(p.loo_accuracy, 4) for p in problems},
    }
    return TagLearner(tag, True, problems, constant, stats)
