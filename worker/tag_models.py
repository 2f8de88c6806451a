"""One learner per `Choices` tag, fitted on the project's annotations and all of its tasks.

A single-choice tag is one classification problem over the labels annotated so far; a multiple-choice tag
is one present/absent problem per label. Each problem averages two answers (worker/learning.py): a ridge
regression on the embeddings, and labels spread over the neighbour graph of the project's tasks, whose
hyper-parameters are all chosen inside the fit by exact leave-one-out on the annotated tasks. The score of
what is predicted is the probability that it is right: a map from what the fit knows about the task (how sure
the mixture is, how near the task lies to the annotated ones and to those of its label, how likely its label
is one nobody annotated yet), learnt on development data, moved by the project's own held-out outcomes as far
as they have evidence for (`learning.fit_calibration`).

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
    GOOD_TURING_PRIOR,
    MAX_LOO,
    PRIOR_BIAS,
    PRIOR_WEIGHTS,
    Ridge,
    RidgeBasis,
    Spread,
    SpreadBasis,
    agreement,
    apply_calibration,
    fit_calibration,
    fit_temperature,
    induce,
    platt_apply,
    prior_logit,
    ridge_basis,
    ridge_fit,
    softmax,
    spread_basis,
    spread_fit,
    task_evidence,
    unseen_mass,
)

Choice = tuple[list[str], float]
LINEAR_WEIGHT = 0.5  # the mixture: half ridge, half spread labels (bench/RESULTS.md)

__all__ = ["Choice", "Neighbours", "Problem", "TagLearner", "agreement", "fit_tag"]


@dataclass
class Neighbours:
    """Tasks to predict, in the learner's terms: their full features, their unit vectors in the graph's
    space (`low`), and their nearest anchors (most similar first, as many as the largest k any problem
    uses)."""

    full: np.ndarray
    low: np.ndarray
    idx: np.ndarray
    sim: np.ndarray


def mix(linear: np.ndarray, graph: np.ndarray | None) -> np.ndarray:
    return linear if graph is None else LINEAR_WEIGHT * linear + (1 - LINEAR_WEIGHT) * graph


@dataclass
class HeldOut:
    """What a problem's fit leaves for calibration and for the benchmarks (not stored with the model): the
    annotated tasks answered without their own label (`rows`: positions into the annotated tasks), each
    part's held-out answer, and the truth."""

    rows: np.ndarray
    linear: np.ndarray
    graph: np.ndarray | None
    truth: np.ndarray
    evidence: np.ndarray | None = None  # learning.task_evidence of each
    shared_label: np.ndarray | None = None  # whether another annotated task has its label (calibration uses those)

    def probabilities(self) -> np.ndarray:
        return mix(self.linear, self.graph)


@dataclass
class Problem:
    classes: list[str]  # single choice: the labels; multiple: [label] (present / absent)
    ridge: Ridge
    temperature: float
    spread: Spread | None
    calibration: tuple[float, float]  # the project's (slope, shift) of the prior map (learning.fit_calibration)
    loo_accuracy: float
    # the annotated tasks a task is compared with (anchor indices, float16 unit vectors) and their classes
    labelled: np.ndarray = field(default_factory=lambda: np.zeros((0, 1), np.float16))
    labelled_classes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    unseen: float = 0.0  # learning.unseen_mass of the annotations
    prior: tuple[tuple[float, ...], float] = (PRIOR_WEIGHTS, PRIOR_BIAS)  # the map its calibration moves
    legacy_platt: tuple[float, float] | None = None  # a model stored before issue 26: its Platt map
    held_out: HeldOut | None = field(default=None, repr=False, compare=False)  # the fit's, not stored

    def parts(self, x: Neighbours) -> tuple[np.ndarray, np.ndarray | None]:
        """The two answers before they are mixed: the ridge's softmax, and the spread labels (None
        without a graph)."""
        linear = softmax((x.full @ self.ridge.weight + self.ridge.bias) / self.temperature)
        if self.spread is None or not len(x.idx):
            return linear, None
        k = self.spread.k
        return linear, induce(self.spread.labels, x.idx[:, :k], x.sim[:, :k])

    def probabilities(self, x: Neighbours) -> np.ndarray:
        """(n, C): for a present/absent problem C is 2, column 1 meaning present."""
        return mix(*self.parts(x))

    def evidence(self, x: Neighbours) -> tuple[np.ndarray, np.ndarray]:
        """(n, C) probabilities, and what each row's score is computed from (learning.task_evidence)."""
        linear, graph = self.parts(x)
        p = mix(linear, graph)
        if len(self.labelled):
            similarity = np.asarray(x.low, np.float32) @ np.asarray(self.labelled, np.float32).T
        else:
            similarity = np.zeros((len(p), 0), np.float32)
        return p, task_evidence(p, similarity, self.labelled_classes, self.unseen)

    def answer(self, x: Neighbours) -> tuple[np.ndarray, np.ndarray]:
        """(n, C) probabilities, and per row the calibrated probability that the most probable class is
        right."""
        if self.legacy_platt is not None:
            p = self.probabilities(x)
            return p, platt_apply(p.max(axis=1), *self.legacy_platt)
        p, evidence = self.evidence(x)
        return p, apply_calibration(prior_logit(evidence, *self.prior), *self.calibration)

    # -- persistence ---------------------------------------------------------------------------------

    def to_meta(self, arrays: dict[str, np.ndarray], prefix: str) -> dict[str, Any]:
        arrays[prefix + "w"] = self.ridge.weight.astype(np.float32)
        arrays[prefix + "b"] = self.ridge.bias.astype(np.float32)
        if self.spread is not None:
            arrays[prefix + "spread"] = self.spread.labels.astype(np.float16)
        arrays[prefix + "labelled"] = self.labelled.astype(np.float16)
        arrays[prefix + "labelled_classes"] = self.labelled_classes.astype(np.int32)
        return {
            "classes": self.classes,
            "ridge_strength": self.ridge.strength,
            "temperature": self.temperature,
            "spread": None if self.spread is None else {"k": self.spread.k, "alpha": self.spread.alpha},
            "calibration": list(self.calibration),
            "unseen": self.unseen,
            "prior": {"weights": list(self.prior[0]), "bias": self.prior[1]},
            "loo_accuracy": self.loo_accuracy,
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray], prefix: str) -> Problem:
        spread = meta.get("spread")
        problem = cls(
            classes=list(meta["classes"]),
            ridge=Ridge(arrays[prefix + "w"], arrays[prefix + "b"], float(meta["ridge_strength"])),
            temperature=float(meta["temperature"]),
            spread=None
            if spread is None
            else Spread(arrays[prefix + "spread"], int(spread["k"]), float(spread["alpha"])),
            calibration=tuple(float(v) for v in meta.get("calibration", (1.0, 0.0))),
            loo_accuracy=float(meta["loo_accuracy"]),
        )
        if "calibration" in meta:
            problem.labelled = arrays[prefix + "labelled"]
            problem.labelled_classes = arrays[prefix + "labelled_classes"]
            problem.unseen = float(meta.get("unseen", 0.0))
            prior = meta.get("prior")
            problem.prior = (
                (tuple(float(w) for w in prior["weights"]), float(prior["bias"])) if prior else GOOD_TURING_PRIOR
            )
        else:
            problem.legacy_platt = (float(meta["platt"][0]), float(meta["platt"][1]))
        return problem


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
            p, scores = problem.answer(x)
            best = p.argmax(axis=1)
            return [([problem.classes[int(c)]], round(float(s), 4)) for c, s in zip(best, scores, strict=True)]
        chosen: list[list[str]] = [[] for _ in range(n)]
        score = np.ones(n)
        for problem in self.problems:
            p, right = problem.answer(x)
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
    """Per tag: the decompositions every problem of the tag reuses, and the annotated tasks in the graph's
    space, which each task's score compares it with."""

    ridge: RidgeBasis
    spread: SpreadBasis | None
    in_graph: np.ndarray  # positions (into the annotated tasks) of those in the graph
    labelled: np.ndarray  # (len(in_graph), r) their unit vectors in the graph's space

    def held_out_similarity(self, rows: np.ndarray) -> np.ndarray:
        """Similarity of the held-out annotated tasks (`rows`: positions into `in_graph`) to the annotated
        tasks in the graph, each held-out task's own column -inf (it is not there when it is held out)."""
        sim = self.labelled[rows] @ self.labelled.T
        sim[np.arange(len(rows)), rows] = -np.inf
        return sim


def _shared(
    x: np.ndarray, anchors: np.ndarray, graphs: dict[int, sp.csr_matrix], seed: int, anchor_low: np.ndarray
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
    labelled = np.asarray(anchor_low, np.float32)[anchors[in_graph]] if spread is not None else np.zeros((0, 1))
    return _Shared(ridge_basis(x), spread, in_graph, labelled.astype(np.float32))


def _fit_problem(
    classes: list[str], y: np.ndarray, shared: _Shared, offered: int
) -> tuple[Problem, np.ndarray, np.ndarray]:
    """`y`: class index per annotated task; `offered`: how many classes the label config offers (a
    present/absent problem: 2). Returns the problem, and the leave-one-out probabilities of the annotated
    tasks (positions into y) they were computed for."""
    c = len(classes) if len(classes) > 1 else 2
    ridge, ridge_loo = ridge_fit(shared.ridge, y, c)
    temperature = fit_temperature(ridge_loo, y)
    linear = softmax(ridge_loo / temperature)
    rows, spread, graph_loo = np.arange(len(y)), None, None
    similarity = np.zeros((len(y), 0))
    if shared.spread is not None:
        spread, graph_loo = spread_fit(shared.spread, y[shared.in_graph], c)
        rows = shared.in_graph[shared.spread.loo_rows]
        similarity = shared.held_out_similarity(shared.spread.loo_rows)
    held = HeldOut(rows, linear[rows], graph_loo, y[rows])
    loo = held.probabilities()
    correct = loo.argmax(axis=1) == held.truth
    labelled_classes = y[shared.in_graph] if shared.spread is not None else np.zeros(0, np.int32)
    counts = np.bincount(y, minlength=c)
    unseen = unseen_mass(counts, offered)
    evidence = held.evidence = task_evidence(loo, similarity, labelled_classes, unseen)
    # A held-out task whose label no other task has is wrong whatever the model: its label is gone. Its
    # outcome says how often labels go unannotated (`unseen` carries that), not how well the model tells
    # the annotated ones apart; and an annotator who labels one of each class makes many such tasks.
    shared_label = held.shared_label = counts[held.truth] > 1
    calibration = fit_calibration(prior_logit(evidence[shared_label]), correct[shared_label])
    problem = Problem(classes, ridge, temperature, spread, calibration, float(correct.mean()),
                      shared.labelled.astype(np.float16), labelled_classes.astype(np.int32), unseen)  # fmt: skip
    problem.held_out = held
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
    anchor_low: np.ndarray | None = None,
) -> TagLearner | None:
    """`annotated`: (row into `full`, labels chosen) per annotated task; `anchor_of`: anchor index per row
    of `full` (-1: not an anchor); `anchor_low`: the anchors' unit vectors in the graph's space. None when
    the annotations hold no two labels to tell apart."""
    rows = np.array([r for r, _ in annotated], int)
    x, anchors = full[rows], anchor_of[rows]
    low = anchor_low if anchor_low is not None else np.zeros((0, 1), np.float32)
    n = len(rows)
    if not multiple:
        labels = [chosen[0] for _, chosen in annotated]
        classes = sorted(set(labels))
        if len(classes) < 2:
            return None
        y = np.array([classes.index(label) for label in labels])
        offered = len(set(all_labels) | set(classes))
        problem, loo_rows, loo = _fit_problem(classes, y, _shared(x, anchors, graphs, seed, low), offered)
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
        shared = shared or _shared(x, anchors, graphs, seed, low)
        problem, loo_rows, loo = _fit_problem([label], y, shared, 2)
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
