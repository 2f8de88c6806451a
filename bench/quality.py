"""How good are the backend's suggestions: its own learning code on any labelled image folder.

FOLDER holds one sub-folder per class (the class name is the sub-folder's name). The images are embedded
once with the configured backbone (the worker's Embedder); then, for each fraction and seed, annotators are
simulated by labelling a random subset of the tasks, the project model is fitted on all the tasks exactly
as the worker's refit does (`worker.project_model.fit_project_model`, one single-choice tag `class`), and
its predictions for the remaining tasks are scored against their true class:

- accuracy and macro-F1, a task without an answer counting as wrong (coverage says how many had one);
- expected calibration error (10 equal-width bins over the score of the predicted label; tasks without an
  answer are left out of the ECE);
- which evidence the model picked for the tag (`classifier` or `clusters`), counted over the seeds.

Two references on the same split and the same L2-normalised embeddings: a plain logistic regression
trained on all the annotated tasks (what one would do by hand), and the constant majority label of the
annotated tasks (its score, for the ECE, is that label's frequency among the annotated).

    python bench/quality.py FOLDER [--fractions 0.05,0.1,0.2] [--seeds 5] [--backbone NAME]
                                   [--image-size N] [--limit-per-class N] [--clusters K] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.label_config import LabelConfig, parse_label_config  # noqa: E402
from common.models import image_size  # noqa: E402
from common.settings import Settings  # noqa: E402
from worker.backbones import create_backbone  # noqa: E402
from worker.embedder import Embedder, pick_device  # noqa: E402
from worker.images import decode_image, to_model_input  # noqa: E402
from worker.project_model import fit_project_model, normalise  # noqa: E402
from worker.results import build_prediction  # noqa: E402

TAG = "class"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp"}
BINS = 10
METRICS = ("accuracy", "macro_f1", "ece", "coverage", "mean_score")


# -- the data ---------------------------------------------------------------------------------------------


def list_images(folder: Path, limit_per_class: int, seed: int = 0) -> tuple[list[Path], list[str], dict[str, int]]:
    """Images and their class (sub-folder name); at most `limit_per_class` per class, drawn at random."""
    rng = np.random.default_rng(seed)
    paths: list[Path] = []
    labels: list[str] = []
    available: dict[str, int] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            continue
        available[sub.name] = len(files)
        if limit_per_class and len(files) > limit_per_class:
            files = [files[i] for i in sorted(rng.choice(len(files), limit_per_class, replace=False))]
        paths += files
        labels += [sub.name] * len(files)
    return paths, labels, available


def label_config(classes: list[str]) -> LabelConfig:
    choices = "".join(f"<Choice value={quoteattr(c)}/>" for c in classes)
    return parse_label_config(
        '<View><Image name="image" value="$image"/>'
        f'<Choices name="{TAG}" toName="image" choice="single">{choices}</Choices></View>'
    )


def embed(paths: list[Path], settings: Settings, size: int, device: str) -> tuple[np.ndarray, dict[str, Any]]:
    backbone = create_backbone(settings.backbone, settings.weights or None)
    embedder = Embedder(backbone, pick_device(device), size, settings.batch_size)
    start = time.perf_counter()
    pixels = [to_model_input(decode_image(p.read_bytes(), settings.image_max_pixels), size) for p in paths]
    decode_s = time.perf_counter() - start
    embedder.embed(pixels[: embedder.batch_size])  # warm-up
    start = time.perf_counter()
    features = embedder.embed(pixels)
    model_s = time.perf_counter() - start
    info = {
        "device": str(embedder.device),
        "batch_size": embedder.batch_size,
        "decode_images_per_s": len(paths) / decode_s,
        "model_images_per_s": len(paths) / model_s,
    }
    return features, info


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
        "mean_score": float(conf.mean()) if len(conf) else float("nan"),  # vs accuracy: over- or under-confident
        "coverage": float(answered.mean()),
    }


# -- one simulated project --------------------------------------------------------------------------------


def run_once(
    features: np.ndarray, truth: list[str], classes: list[str], config: LabelConfig, fraction: float, seed: int,
    clusters: int,
) -> dict[str, Any]:  # fmt: skip
    n = len(truth)
    rng = np.random.default_rng([seed, round(fraction * 1_000_000)])
    n_annotated = int(min(n - 1, max(1, round(fraction * n))))
    order = rng.permutation(n)
    annotated, rest = np.sort(order[:n_annotated]), np.sort(order[n_annotated:])
    task_ids = list(range(1, n + 1))  # Label Studio ids; position i holds task i + 1
    labels = {int(i) + 1: {TAG: [truth[i]]} for i in annotated}
    rest_truth = [truth[i] for i in rest]

    # The backend, as worker/learn_tasks.py refits a project (every task's features, the annotated labels)
    # and as its repredict answers the rest (build_prediction: what Label Studio would be sent).
    start = time.perf_counter()
    model = fit_project_model("", features, task_ids, labels, config, clusters=clusters, head_map=None)
    fit_s = time.perf_counter() - start
    predicted: list[str | None] = []
    scores: list[float | None] = []
    for choices in model.predict(features[rest], None, ()):
        items = [r for r in build_prediction(choices, config, "")["result"] if r["from_name"] == TAG]
        predicted.append(items[0]["value"]["choices"][0] if items else None)
        scores.append(float(items[0]["score"]) if items else None)
    backend = score(rest_truth, predicted, scores, classes)

    # References on the same split, the same normalised features.
    x = normalise(features)
    y = [truth[i] for i in annotated]
    if len(set(y)) >= 2:
        lr = LogisticRegression(max_iter=2000).fit(x[annotated], y)
        probs = lr.predict_proba(x[rest])
        lr_pred = [str(lr.classes_[j]) for j in probs.argmax(axis=1)]
        lr_scores: list[float | None] = [float(p) for p in probs.max(axis=1)]
    else:  # one class annotated: a classifier can only answer that class
        lr_pred, lr_scores = [y[0]] * len(rest), [1.0] * len(rest)
    reference = score(rest_truth, list(lr_pred), lr_scores, classes)
    majority_label, majority_count = Counter(y).most_common(1)[0]
    majority = score(rest_truth, [majority_label] * len(rest), [majority_count / len(y)] * len(rest), classes)

    return {
        "fraction": fraction,
        "seed": seed,
        "annotated": n_annotated,
        "evaluated": len(rest),
        "annotated_counts": dict(Counter(y)),
        "backend": backend,
        "picked": model.primary.get(TAG, "none"),
        "evidence": model.stats.get("evidence", {}).get(TAG, {}),
        "clusters": model.stats.get("clusters"),
        "fit_seconds": fit_s,
        "logistic_regression": reference,
        "majority": {**majority, "label": majority_label},
    }


# -- the report -------------------------------------------------------------------------------------------


def mean_sd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v == v]  # drop NaN
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"annotated": runs[0]["annotated"], "seeds": len(runs)}
    for who in ("backend", "logistic_regression", "majority"):
        out[who] = {m: mean_sd([r[who][m] for r in runs]) for m in METRICS}
    out["picked"] = dict(Counter(r["picked"] for r in runs))
    out["backend_minus_lr"] = {
        m: mean_sd([r["backend"][m] - r["logistic_regression"][m] for r in runs]) for m in ("accuracy", "macro_f1")
    }
    out["clusters"] = sorted({r["clusters"] for r in runs})
    return out


def print_table(summary: dict[float, dict[str, Any]]) -> None:
    def pm(v: tuple[float, float]) -> str:
        return f"{v[0]:.3f} ± {v[1]:.3f}"

    header = (
        f"{'fraction':>8} | {'annotated n':>11} | {'backend acc ± sd':>16} | {'macro-F1 ± sd':>15} | {'ECE':>5} | "
        f"{'coverage':>8} | {'LR acc':>6} | {'LR macro-F1':>11} | {'LR ECE':>6} | {'majority acc':>12} | "
        f"{'majority macro-F1':>17} | picked"
    )
    print(header)
    print("-" * len(header))
    for fraction, s in summary.items():
        b, lr, mj = s["backend"], s["logistic_regression"], s["majority"]
        picked = ", ".join(f"{k} {v}" for k, v in sorted(s["picked"].items()))
        print(
            f"{fraction:>8g} | {s['annotated']:>11} | {pm(b['accuracy']):>16} | {pm(b['macro_f1']):>15} | "
            f"{b['ece'][0]:>5.3f} | {b['coverage'][0]:>8.3f} | {lr['accuracy'][0]:>6.3f} | "
            f"{lr['macro_f1'][0]:>11.3f} | {lr['ece'][0]:>6.3f} | {mj['accuracy'][0]:>12.3f} | "
            f"{mj['macro_f1'][0]:>17.3f} | {picked}"
        )
    print("means over seeds; ± is the sd over seeds. Tasks without an answer count as wrong for acc and macro-F1 "
          "and are left out of the backend's ECE.")  # fmt: skip
    for fraction, s in summary.items():
        d = s["backend_minus_lr"]
        print(f"  {fraction:g}: backend - LR, paired over seeds: acc {d['accuracy'][0]:+.3f} ± {d['accuracy'][1]:.3f}, "
              f"macro-F1 {d['macro_f1'][0]:+.3f} ± {d['macro_f1'][1]:.3f}; backend mean score "
              f"{s['backend']['mean_score'][0]:.3f} (LR {s['logistic_regression']['mean_score'][0]:.3f}); "
              f"k-means k {s['clusters']}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="one sub-folder of images per class")
    parser.add_argument("--fractions", default="0.05,0.1,0.2", help="fractions of the tasks annotated")
    parser.add_argument("--seeds", type=int, default=5, help="random annotated subsets per fraction")
    parser.add_argument("--backbone", default=Settings.from_env().backbone)
    parser.add_argument("--image-size", type=int, default=0, help="0: the backend's default for the backbone")
    parser.add_argument("--limit-per-class", type=int, default=0, help="at most this many images per class")
    parser.add_argument("--clusters", type=int, default=0, help="k-means clusters; 0: the backend's automatic k")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args()

    settings = Settings.from_env()
    settings = dataclasses.replace(settings, backbone=args.backbone, image_size=args.image_size or settings.image_size)
    size = image_size(settings)
    paths, truth, available = list_images(args.folder, args.limit_per_class)
    classes = sorted(set(truth))
    if len(classes) < 2:
        parser.error(f"{args.folder} needs at least two sub-folders with images")
    config = label_config(classes)
    features, info = embed(paths, settings, size, args.device)
    used = dict(Counter(truth))
    print(f"folder {args.folder}: {len(paths)} images, classes {used}"
          + (f" (of {available})" if used != available else ""))  # fmt: skip
    print(f"backbone {settings.backbone} at {size} px on {info['device']} (batch {info['batch_size']}): "
          f"{info['model_images_per_s']:.1f} images/s model-only, {info['decode_images_per_s']:.1f} images/s "
          f"decode + resize; features cached in memory")  # fmt: skip

    fractions = [float(f) for f in args.fractions.split(",")]
    runs: list[dict[str, Any]] = []
    start = time.perf_counter()
    for fraction in fractions:
        for seed in range(args.seeds):
            runs.append(run_once(features, truth, classes, config, fraction, seed, args.clusters))
    summary = {f: summarise([r for r in runs if r["fraction"] == f]) for f in fractions}
    print(f"{len(runs)} simulated projects in {time.perf_counter() - start:.1f} s "
          f"(clusters: {args.clusters or 'auto'})\n")  # fmt: skip
    print_table(summary)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "folder": str(args.folder),
                    "classes": used,
                    "available": available,
                    "backbone": settings.backbone,
                    "image_size": size,
                    "clusters": args.clusters,
                    **info,
                    "summary": {str(f): s for f, s in summary.items()},
                    "runs": runs,
                },
                indent=2,
            )
        )
        print(f"numbers written to {args.json}")


if __name__ == "__main__":
    main()
