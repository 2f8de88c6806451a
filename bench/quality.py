"""How good are the backend's suggestions, against the strongest simple learners on the same annotations.

Each DATASET is a labelled image collection: `zoolake` (35 lake plankton classes, 350 images), `zoolake-taxa`
(its 27 taxa, 270), `flowcam-shape` (2,100 real FlowCam particles with a proxy shape label measured from
their outline, bench/proxy_labels.py), or any folder with one sub-folder of images per class. The images
are embedded once per (backbone, input size) and the features cached under `.bench-data/features/`.

For each fraction (5%, 10%, 20%) and seed (20), annotators are simulated by labelling a random subset of the
tasks. On that same split and the same features:

- **the backend**: `worker.project_model.fit_project_model` on every task (annotated or not), exactly as a
  refit does, then `model.predict` on the other tasks and `build_prediction`, what Label Studio is sent;
- **references**, each with its hyper-parameters chosen by 5-fold cross-validation on the annotated tasks:
  logistic regression on the raw features and on standardised features (C from 1e-4 to 1e3), k-nearest
  neighbours (cosine, k from 1 to 15), label spreading over a k-NN graph of all the tasks (k 5, 10, 20 and
  alpha 0.2 to 0.99, as scikit-learn's LabelSpreading computes it), and the majority label.

Scored on the tasks not annotated: accuracy and macro-F1 (a task without an answer counts as wrong),
coverage (the share with an answer), expected calibration error of the score of the predicted label
(10 equal-width bins; per seed, then averaged; and pooled over the seeds, which is the calibration of the
scoring method with less of the noise of a few hundred tasks; `ECE floor` is what a perfectly calibrated
score would measure with the same scores and task counts), and the mean score. The backend's paired
difference to the **best** reference (the one with the highest mean accuracy at that fraction) is given per
seed: mean, 95% interval, and seeds won / tied / lost.

`--order` also measures the order the README tells annotators to use (Data Manager sorted by prediction
score, ascending): starting from the same random first batch, annotators label in batches of
`max(REFIT_EVERY, 1% of the tasks)`, the backend refitting after each, either the least certain tasks
first or tasks at random. A fifth of the tasks is held out and never labelled: the accuracy on it after 5%,
10% and 20% of the others are labelled measures the model; the accuracy of the suggestions on the
not-yet-labelled tasks is what annotators see next.

    python bench/quality.py [DATASET ...] [--image-sizes 48,224] [--seeds 20] [--fractions 0.05,0.1,0.2]
                            [--order] [--order-seeds 10] [--backbone NAME] [--json PATH] [--no-cache]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np
import scipy.sparse as sp
from scipy import stats as scipy_stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import KFold, StratifiedKFold

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common.label_config import LabelConfig, parse_label_config  # noqa: E402
from common.settings import Settings  # noqa: E402
from tests.helpers import DATA  # noqa: E402
from worker.project_model import fit_project_model  # noqa: E402
from worker.results import build_prediction  # noqa: E402

TAG = "class"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp"}
BINS = 10
CACHE = REPO / ".bench-data" / "features"
METRICS = ("accuracy", "macro_f1", "ece", "coverage", "mean_score")
# ZooLake classes that are not taxa (its README): catch-alls, artefacts, and `rotifers` (overlaps the rest)
NOT_TAXA = {"dirt", "unknown", "unknown_plankton", "maybe_cyano", "copepod_skins", "daphnia_skins", "filament",
            "rotifers"}  # fmt: skip
REFERENCES = ("lr_raw", "lr_std", "knn", "label_spreading", "majority")
C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
KNN_GRID = (1, 3, 5, 7, 9, 15)
SPREAD_KS = (5, 10, 20)
SPREAD_ALPHAS = (0.2, 0.5, 0.8, 0.99)


# -- the data ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Dataset:
    name: str
    paths: list[Path]
    labels: list[str]

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))

    def key(self) -> str:
        digest = hashlib.sha1("\n".join(str(p) for p in self.paths).encode()).hexdigest()[:12]
        return f"{self.name.replace('/', '_')}-{digest}"


def image_folder(folder: Path, skip: set[str] = frozenset()) -> tuple[list[Path], list[str]]:
    paths: list[Path] = []
    labels: list[str] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and p.name not in skip):
        files = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        paths += files
        labels += [sub.name] * len(files)
    return paths, labels


def load_dataset(spec: str) -> Dataset:
    if spec == "zoolake":
        return Dataset(spec, *image_folder(DATA / "labelled" / "zoolake"))
    if spec == "zoolake-taxa":
        return Dataset(spec, *image_folder(DATA / "labelled" / "zoolake", NOT_TAXA))
    if spec == "flowcam-shape":
        from proxy_labels import labelled_particles

        pairs = labelled_particles()
        return Dataset(spec, [p for p, _ in pairs], [label for _, label in pairs])
    folder = Path(spec)
    if not folder.is_dir():
        raise SystemExit(f"{spec}: not a data set name (zoolake, zoolake-taxa, flowcam-shape) nor a folder")
    return Dataset(folder.name, *image_folder(folder))


def label_config(classes: list[str]) -> LabelConfig:
    choices = "".join(f"<Choice value={quoteattr(c)}/>" for c in classes)
    return parse_label_config(
        '<View><Image name="image" value="$image"/>'
        f'<Choices name="{TAG}" toName="image" choice="single">{choices}</Choices></View>'
    )


def embed(
    dataset: Dataset, backbone_name: str, size: int, device: str = "cpu", batch_size: int = 32, cache: bool = True
) -> tuple[np.ndarray, dict[str, Any]]:
    """Pooled backbone features (n, dim) of every image, as the worker computes them; cached on disk per
    (backbone, size, data set) so each is computed once."""
    path = CACHE / f"{backbone_name}-{size}px" / f"{dataset.key()}.npy"
    if cache and path.is_file():
        return np.load(path), {"cached": str(path.relative_to(REPO))}
    from worker.backbones import create_backbone
    from worker.embedder import Embedder, pick_device
    from worker.images import decode_image, to_model_input

    settings = Settings.from_env()
    embedder = Embedder(create_backbone(backbone_name, settings.weights or None), pick_device(device), size, batch_size)
    start = time.perf_counter()
    pixels = [to_model_input(decode_image(p.read_bytes(), settings.image_max_pixels), size) for p in dataset.paths]
    decode_s = time.perf_counter() - start
    start = time.perf_counter()
    features = embedder.embed(pixels)
    model_s = time.perf_counter() - start
    info = {"decode_images_per_s": len(pixels) / decode_s, "model_images_per_s": len(pixels) / model_s}
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, features.astype(np.float32))
    return features.astype(np.float32), info


# -- the metrics ------------------------------------------------------------------------------------------


def expected_calibration_error(scores: np.ndarray, correct: np.ndarray, bins: int = BINS) -> float:
    """Equal-width bins over [0, 1]; the bin-size-weighted gap between accuracy and mean score."""
    if not len(scores):
        return float("nan")
    which = np.minimum((np.clip(scores, 0.0, 1.0) * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            total += in_bin.sum() * abs(float(correct[in_bin].mean()) - float(scores[in_bin].mean()))
    return total / len(scores)


def ece_floor(scores: np.ndarray, draws: int = 20, seed: int = 0) -> float:
    """The ECE a perfectly calibrated score would measure on this many tasks: outcomes drawn from the
    scores themselves."""
    if not len(scores):
        return float("nan")
    rng = np.random.default_rng(seed)
    return float(np.mean([expected_calibration_error(scores, rng.random(len(scores)) < scores) for _ in range(draws)]))


def score(truth: list[str], predicted: list[str | None], scores: list[float | None], classes: list[str]) -> dict:
    """A missing answer (None) is wrong for accuracy and macro-F1 and left out of the ECE."""
    pred = [p if p is not None else "\0none" for p in predicted]
    correct = np.array([p == t for p, t in zip(pred, truth, strict=True)])
    answered = np.array([p is not None for p in predicted])
    conf = np.array([s for s, a in zip(scores, answered, strict=True) if a], np.float64)
    return {
        "accuracy": float(correct.mean()),
        "macro_f1": float(f1_score(truth, pred, labels=classes, average="macro", zero_division=0)),
        "ece": float(expected_calibration_error(conf, correct[answered])),
        "mean_score": float(conf.mean()) if len(conf) else float("nan"),
        "coverage": float(answered.mean()),
        "_scores": conf.tolist(),
        "_correct": correct[answered].tolist(),
    }


# -- the references ---------------------------------------------------------------------------------------


def l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def folds(y: np.ndarray, seed: int, k: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    k = int(min(k, len(y)))
    if min(Counter(y.tolist()).values()) >= k:
        return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))
    return list(KFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y))))


def cv_choice(grid: tuple, accuracy_of: Callable[[Any, np.ndarray, np.ndarray], float], y: np.ndarray, seed: int):
    """The grid value with the most held-out tasks right over 5 folds (first on ties)."""
    splits = folds(y, seed)
    best, best_right = grid[0], -1.0
    for value in grid:
        right = sum(accuracy_of(value, train, test) * len(test) for train, test in splits)
        if right > best_right + 1e-9:
            best, best_right = value, right
    return best


class Answer:
    """A reference's answer for the tasks not annotated: class-probability rows over `classes`."""

    def __init__(self, probs: np.ndarray, classes: list[str]) -> None:
        self.probs, self.classes = probs, classes

    def predictions(self) -> tuple[list[str], list[float]]:
        best = self.probs.argmax(axis=1)
        return [self.classes[i] for i in best], [float(v) for v in self.probs.max(axis=1)]


def logistic(x: np.ndarray, annotated: np.ndarray, rest: np.ndarray, y: np.ndarray, seed: int) -> tuple[Answer, float]:
    """Multinomial logistic regression, C by 5-fold CV. Solved in the span of the annotated tasks' features,
    where an L2-penalised linear model's weights always lie: the same answers, far faster."""
    classes = sorted(set(y.tolist()))
    yi = np.array([classes.index(v) for v in y])
    _, s, vt = np.linalg.svd(x[annotated], full_matrices=False)
    q = x @ vt[s > 1e-8 * s[0]].T
    qa = q[annotated]

    def fit(c: float, rows: np.ndarray) -> LogisticRegression:
        return LogisticRegression(C=c, max_iter=3000).fit(qa[rows], yi[rows])

    def accuracy(c: float, train: np.ndarray, test: np.ndarray) -> float:
        if len(set(yi[train].tolist())) < 2:
            return float(np.mean(yi[test] == yi[train][0]))
        return float(np.mean(fit(c, train).predict(qa[test]) == yi[test]))

    c = cv_choice(C_GRID, accuracy, yi, seed)
    model = fit(c, np.arange(len(yi)))
    probs = np.zeros((len(rest), len(classes)))
    probs[:, model.classes_] = model.predict_proba(q[rest])
    return Answer(probs, classes), c


def knn(x: np.ndarray, annotated: np.ndarray, rest: np.ndarray, y: np.ndarray, seed: int) -> tuple[Answer, int]:
    """Majority vote of the k most similar annotated tasks (cosine), k by 5-fold CV; score: vote share."""
    classes = sorted(set(y.tolist()))
    yi = np.array([classes.index(v) for v in y])
    z = l2(x)

    def votes(k: int, train: np.ndarray, queries: np.ndarray) -> np.ndarray:
        """`train`: positions among the annotated tasks; `queries`: task rows."""
        k = min(k, len(train))
        sim = z[queries] @ z[annotated[train]].T
        idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        out = np.zeros((len(queries), len(classes)))
        for j in range(k):
            np.add.at(out, (np.arange(len(queries)), yi[train][idx[:, j]]), 1.0)
        return out / k

    def accuracy(k: int, train: np.ndarray, test: np.ndarray) -> float:
        return float(np.mean(votes(k, train, annotated[test]).argmax(axis=1) == yi[test]))

    k = cv_choice(KNN_GRID, accuracy, yi, seed)
    return Answer(votes(k, np.arange(len(yi)), rest), classes), k


class SpreadingGraphs:
    """scikit-learn's LabelSpreading(kernel="knn"): a symmetric k-NN connectivity graph of all the tasks,
    normalised D^-1/2 W D^-1/2; built once per data set and k."""

    def __init__(self, x: np.ndarray) -> None:
        self.z = l2(x)
        self.graphs: dict[int, sp.csr_matrix] = {}

    def __call__(self, k: int) -> sp.csr_matrix:
        if k not in self.graphs:
            n = len(self.z)
            sim = self.z @ self.z.T
            np.fill_diagonal(sim, -np.inf)
            kk = min(k, n - 1)
            idx = np.argpartition(-sim, kk - 1, axis=1)[:, :kk]
            w = sp.csr_matrix((np.ones(idx.size), (np.repeat(np.arange(n), kk), idx.ravel())), shape=(n, n))
            w = ((w + w.T) > 0).astype(np.float64)
            d = 1.0 / np.sqrt(np.maximum(np.asarray(w.sum(axis=1)).ravel(), 1e-12))
            self.graphs[k] = sp.csr_matrix(sp.diags(d) @ w @ sp.diags(d))
        return self.graphs[k]


def spread(s: sp.csr_matrix, seeds: np.ndarray, alpha: float, iterations: int = 200) -> np.ndarray:
    f = seeds.copy()
    for _ in range(iterations):
        nxt = alpha * (s @ f) + (1 - alpha) * seeds
        if np.abs(nxt - f).sum() < 1e-3:
            return nxt
        f = nxt
    return f


def label_spreading(
    graphs: SpreadingGraphs, annotated: np.ndarray, rest: np.ndarray, y: np.ndarray, seed: int
) -> tuple[Answer, tuple[int, float]]:
    classes = sorted(set(y.tolist()))
    yi = np.array([classes.index(v) for v in y])
    n = len(graphs.z)

    def run(params: tuple[int, float], train: np.ndarray) -> np.ndarray:
        seeds = np.zeros((n, len(classes)))
        seeds[annotated[train], yi[train]] = 1.0
        f = spread(graphs(params[0]), seeds, params[1])
        total = f.sum(axis=1, keepdims=True)
        return np.where(total > 0, f / np.maximum(total, 1e-300), 1.0 / len(classes))

    def accuracy(params: tuple[int, float], train: np.ndarray, test: np.ndarray) -> float:
        return float(np.mean(run(params, train)[annotated[test]].argmax(axis=1) == yi[test]))

    grid = tuple((k, a) for k in SPREAD_KS for a in SPREAD_ALPHAS)
    params = cv_choice(grid, accuracy, yi, seed)
    return Answer(run(params, np.arange(len(yi)))[rest], classes), params


# -- one simulated project --------------------------------------------------------------------------------


def backend_answers(
    features: np.ndarray, truth: list[str], config: LabelConfig, labelled: np.ndarray, ask: np.ndarray, seed: int = 0
) -> tuple[list[str | None], list[float | None], Any, float]:
    """Fit as a refit does (every task, the labelled ones' labels) and answer `ask` as Label Studio is sent."""
    task_ids = list(range(1, len(truth) + 1))  # Label Studio ids; position i holds task i + 1
    labels = {int(i) + 1: {TAG: [truth[i]]} for i in labelled}
    start = time.perf_counter()
    model = fit_project_model("", features, task_ids, labels, config, seed=seed)
    fit_s = time.perf_counter() - start
    predicted: list[str | None] = []
    scores: list[float | None] = []
    for choices in model.predict(features[ask], None, ()):
        items = [r for r in build_prediction(choices, config, "")["result"] if r["from_name"] == TAG]
        predicted.append(items[0]["value"]["choices"][0] if items else None)
        scores.append(float(items[0]["score"]) if items else None)
    return predicted, scores, model, fit_s


def run_once(
    features: np.ndarray, truth: list[str], classes: list[str], config: LabelConfig, fraction: float, seed: int,
    graphs: SpreadingGraphs, standardised: np.ndarray,
) -> dict[str, Any]:  # fmt: skip
    n = len(truth)
    rng = np.random.default_rng([seed, round(fraction * 1_000_000)])
    n_annotated = int(min(n - 1, max(1, round(fraction * n))))
    order = rng.permutation(n)
    annotated, rest = np.sort(order[:n_annotated]), np.sort(order[n_annotated:])
    rest_truth = [truth[i] for i in rest]
    y = np.array([truth[i] for i in annotated])

    predicted, scores, model, fit_s = backend_answers(features, truth, config, annotated, rest)
    out: dict[str, Any] = {
        "fraction": fraction,
        "seed": seed,
        "annotated": n_annotated,
        "annotated_classes": len(set(y.tolist())),
        "evaluated": len(rest),
        "backend": score(rest_truth, predicted, scores, classes),
        "evidence": model.stats.get("evidence", {}).get(TAG, {}),
        "fit_seconds": fit_s,
        "chosen": {},
    }
    label, count = Counter(y.tolist()).most_common(1)[0]
    out["majority"] = score(rest_truth, [label] * len(rest), [count / len(y)] * len(rest), classes)
    if len(set(y.tolist())) < 2:  # one class annotated: every reference can only answer that class
        for name in REFERENCES[:-1]:
            out[name] = out["majority"]
        return out
    for name, fit in (
        ("lr_raw", lambda: logistic(features, annotated, rest, y, seed)),
        ("lr_std", lambda: logistic(standardised, annotated, rest, y, seed)),
        ("knn", lambda: knn(features, annotated, rest, y, seed)),
        ("label_spreading", lambda: label_spreading(graphs, annotated, rest, y, seed)),
    ):
        answer, chosen = fit()
        out[name] = score(rest_truth, *answer.predictions(), classes)
        out["chosen"][name] = chosen
    return out


# -- labelling order: least certain first, or at random ---------------------------------------------------


def order_run(
    features: np.ndarray, truth: list[str], classes: list[str], config: LabelConfig, fractions: list[float],
    seed: int, batch: int,
) -> dict[str, Any]:  # fmt: skip
    n = len(truth)
    rng = np.random.default_rng([seed, 77])
    perm = rng.permutation(n)
    held = np.sort(perm[: n // 5])
    pool = perm[n // 5 :]  # in random order
    targets = [int(max(batch, round(f * len(pool)))) for f in fractions]
    held_truth = [truth[i] for i in held]
    out: dict[str, Any] = {"seed": seed, "batch": batch, "pool": len(pool), "held_out": len(held)}
    for arm in ("random", "least_certain"):
        labelled = list(pool[:batch])  # the same first batch: nothing is predicted yet
        results = []
        for target in targets:
            while len(labelled) < target:
                if arm == "random":
                    chosen = set(labelled)
                    labelled += [int(t) for t in pool if int(t) not in chosen][: min(batch, target - len(labelled))]
                    continue
                left = np.array([t for t in pool if t not in set(labelled)])
                _, scores, _, _ = backend_answers(features, truth, config, np.array(labelled), left, seed)
                key = np.array([-1.0 if s is None else s for s in scores])
                take = left[np.argsort(key, kind="stable")[: min(batch, target - len(labelled))]]
                labelled += [int(t) for t in take]
            lab = np.array(labelled)
            left = np.array([t for t in pool if t not in set(labelled)])
            ask = np.concatenate([held, left])
            predicted, scores, _, _ = backend_answers(features, truth, config, lab, ask, seed)
            on_held = score(held_truth, predicted[: len(held)], scores[: len(held)], classes)
            on_left = score([truth[i] for i in left], predicted[len(held) :], scores[len(held) :], classes)
            results.append(
                {
                    "labelled": len(lab),
                    "classes_labelled": len({truth[i] for i in lab}),
                    "held_out_accuracy": on_held["accuracy"],
                    "held_out_macro_f1": on_held["macro_f1"],
                    "suggestions_accuracy": on_left["accuracy"],
                }
            )
        out[arm] = results
    return out


# -- the report -------------------------------------------------------------------------------------------


def mean_sd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v == v]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired(diffs: list[float]) -> dict[str, Any]:
    m, sd = mean_sd(diffs)
    half = float(scipy_stats.t.ppf(0.975, len(diffs) - 1) * sd / math.sqrt(len(diffs))) if len(diffs) > 1 else 0.0
    return {
        "mean": m,
        "sd": sd,
        "ci95": [m - half, m + half],
        "won": sum(d > 1e-12 for d in diffs),
        "tied": sum(abs(d) <= 1e-12 for d in diffs),
        "lost": sum(d < -1e-12 for d in diffs),
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "annotated": runs[0]["annotated"],
        "annotated_classes": mean_sd([r["annotated_classes"] for r in runs])[0],
        "seeds": len(runs),
        "fit_seconds": mean_sd([r["fit_seconds"] for r in runs])[0],
    }
    for who in ("backend", *REFERENCES):
        out[who] = {m: mean_sd([r[who][m] for r in runs]) for m in METRICS}
        scores = np.concatenate([np.asarray(r[who]["_scores"], float) for r in runs])
        correct = np.concatenate([np.asarray(r[who]["_correct"], bool) for r in runs])
        out[who]["ece_pooled"] = float(expected_calibration_error(scores, correct))
        out[who]["ece_floor"] = mean_sd([ece_floor(np.asarray(r[who]["_scores"], float)) for r in runs])[0]
    best = max(REFERENCES, key=lambda name: out[name]["accuracy"][0])
    out["best_reference"] = best
    out["backend_minus_best"] = {
        m: paired([r["backend"][m] - r[best][m] for r in runs]) for m in ("accuracy", "macro_f1")
    }
    out["chosen"] = {
        name: dict(Counter(str(r["chosen"].get(name)) for r in runs).most_common(3)) for name in REFERENCES[:-1]
    }
    out["backend_spread"] = dict(Counter(str(r["evidence"].get("spread")) for r in runs).most_common(3))
    return out


NAMES = {"backend": "backend", "lr_raw": "LR raw", "lr_std": "LR standardised", "knn": "kNN",
         "label_spreading": "label spreading", "majority": "majority"}  # fmt: skip


def print_table(title: str, summary: dict[float, dict[str, Any]]) -> None:
    print(f"\n### {title}\n")
    print("| annotated | learner | accuracy ± sd | macro-F1 | ECE (per seed / pooled / floor) | coverage | "
          "mean score |")  # fmt: skip
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for fraction, s in summary.items():
        for who in ("backend", *REFERENCES):
            m = s[who]
            name = NAMES[who] + (" (best reference)" if who == s["best_reference"] else "")
            if who == "backend":
                name = f"**{name}**"
            print(
                f"| {fraction:.0%} ({s['annotated']}, {s['annotated_classes']:.1f} classes) | {name} | "
                f"{m['accuracy'][0]:.3f} ± {m['accuracy'][1]:.3f} | {m['macro_f1'][0]:.3f} | "
                f"{m['ece'][0]:.3f} / {m['ece_pooled']:.3f} / {m['ece_floor']:.3f} | {m['coverage'][0]:.3f} | "
                f"{m['mean_score'][0]:.3f} |"
            )
    print()
    print("| annotated | best reference | backend − best: accuracy [95% CI] | won/tied/lost | macro-F1 [95% CI] | "
          "backend fit s |")  # fmt: skip
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for fraction, s in summary.items():
        a, f = s["backend_minus_best"]["accuracy"], s["backend_minus_best"]["macro_f1"]
        print(
            f"| {fraction:.0%} | {NAMES[s['best_reference']]} | {a['mean']:+.3f} [{a['ci95'][0]:+.3f}, "
            f"{a['ci95'][1]:+.3f}] | {a['won']}/{a['tied']}/{a['lost']} | {f['mean']:+.3f} [{f['ci95'][0]:+.3f}, "
            f"{f['ci95'][1]:+.3f}] | {s['fit_seconds']:.2f} |"
        )
    print()
    for fraction, s in summary.items():
        print(f"- {fraction:.0%}: hyper-parameters chosen (most frequent): {s['chosen']}; backend spreading "
              f"{s['backend_spread']}")  # fmt: skip


def print_order(title: str, runs: list[dict[str, Any]], fractions: list[float]) -> dict[str, Any]:
    print(f"\n### {title}: labelling order\n")
    print(f"{len(runs)} seeds; batches of {runs[0]['batch']} (a refit after each); pool {runs[0]['pool']} tasks, "
          f"{runs[0]['held_out']} held out")  # fmt: skip
    print()
    print("| labelled | held-out accuracy: random | least certain first | difference [95% CI] | "
          "classes labelled: random / least certain | suggestions accuracy: random / least certain |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    table = {}
    for j, fraction in enumerate(fractions):
        rand = [r["random"][j] for r in runs]
        unc = [r["least_certain"][j] for r in runs]
        d = paired([u["held_out_accuracy"] - r["held_out_accuracy"] for u, r in zip(unc, rand, strict=True)])
        row = {
            "labelled": rand[0]["labelled"],
            "random": mean_sd([r["held_out_accuracy"] for r in rand]),
            "least_certain": mean_sd([u["held_out_accuracy"] for u in unc]),
            "difference": d,
            "classes_random": mean_sd([r["classes_labelled"] for r in rand])[0],
            "classes_least_certain": mean_sd([u["classes_labelled"] for u in unc])[0],
            "suggestions_random": mean_sd([r["suggestions_accuracy"] for r in rand])[0],
            "suggestions_least_certain": mean_sd([u["suggestions_accuracy"] for u in unc])[0],
        }
        table[fraction] = row
        print(
            f"| {fraction:.0%} ({row['labelled']}) | {row['random'][0]:.3f} | {row['least_certain'][0]:.3f} | "
            f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] | {row['classes_random']:.1f} / "
            f"{row['classes_least_certain']:.1f} | {row['suggestions_random']:.3f} / "
            f"{row['suggestions_least_certain']:.3f} |"
        )
    return table


def strip_private(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: ({m: v for m, v in val.items() if not m.startswith("_")} if isinstance(val, dict) else val)
             for k, val in r.items()} for r in runs]  # fmt: skip


def main() -> None:
    warnings.filterwarnings("ignore", module="sklearn")  # one-member classes in a fold, lbfgs notes
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datasets", nargs="*", default=["zoolake", "zoolake-taxa", "flowcam-shape"])
    parser.add_argument("--image-sizes", default="", help="comma-separated; default: the backend's default size")
    parser.add_argument("--fractions", default="0.05,0.1,0.2", help="fractions of the tasks annotated")
    parser.add_argument("--seeds", type=int, default=20, help="random annotated subsets per fraction")
    parser.add_argument("--order", action="store_true", help="also measure least-certain-first against random")
    parser.add_argument("--order-seeds", type=int, default=10)
    parser.add_argument("--backbone", default=Settings.from_env().backbone)
    parser.add_argument("--device", default="cpu", help="only for embedding images not cached yet")
    parser.add_argument("--no-cache", action="store_true", help="embed again instead of reading .bench-data/")
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args()

    from common.models import image_size

    sizes = [int(s) for s in args.image_sizes.split(",") if s] or [image_size(Settings.from_env())]
    fractions = [float(f) for f in args.fractions.split(",")]
    report: dict[str, Any] = {"backbone": args.backbone, "seeds": args.seeds, "results": {}}
    for spec in args.datasets:
        dataset = load_dataset(spec)
        classes, truth = dataset.classes, dataset.labels
        config = label_config(classes)
        counts = Counter(truth)
        for size in sizes:
            features, info = embed(dataset, args.backbone, size, args.device, cache=not args.no_cache)
            title = f"{dataset.name}, {args.backbone} at {size} px"
            print(f"\n## {title}: {len(truth)} images, {len(classes)} classes ({min(counts.values())} to "
                  f"{max(counts.values())} per class); features {info}", flush=True)  # fmt: skip
            graphs = SpreadingGraphs(features)
            standardised = (features - features.mean(axis=0)) / (features.std(axis=0) + 1e-6)
            start = time.perf_counter()
            runs = [
                run_once(features, truth, classes, config, fraction, seed, graphs, standardised)
                for fraction in fractions
                for seed in range(args.seeds)
            ]
            summary = {f: summarise([r for r in runs if r["fraction"] == f]) for f in fractions}
            print(f"{len(runs)} simulated projects in {time.perf_counter() - start:.0f} s")
            print_table(title, summary)
            entry: dict[str, Any] = {"summary": {str(f): s for f, s in summary.items()}, "runs": strip_private(runs)}
            if args.order:
                batch = max(Settings.from_env().refit_every, round(0.01 * len(truth)))
                start = time.perf_counter()
                order_runs = [order_run(features, truth, classes, config, fractions, seed, batch)
                              for seed in range(args.order_seeds)]  # fmt: skip
                entry["order"] = {str(k): v for k, v in print_order(title, order_runs, fractions).items()}
                entry["order_runs"] = order_runs
                print(f"\n(order: {time.perf_counter() - start:.0f} s)")
            report["results"][f"{dataset.name}@{size}"] = entry
            sys.stdout.flush()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=float))
        print(f"\nnumbers written to {args.json}")


if __name__ == "__main__":
    main()
