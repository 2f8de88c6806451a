"""Which input size to feed the backbone: quality and speed, measured in one run on real particles.

For each size: model-only images/s (the worker's Embedder, batch as configured, images already decoded)
and how well the embeddings separate the proxy `shape` classes of bench/proxy_labels.py (5-fold logistic
regression accuracy and macro-F1, and k-means cluster purity), on the same balanced sample.

    python bench/input_size.py [--sizes 32,64,96,128,224] [--per-class 300] [--backbone efficientnet-lite0]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import cross_val_predict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxy_labels import labelled_particles  # noqa: E402

from common.settings import Settings  # noqa: E402
from worker.backbones import create_backbone  # noqa: E402
from worker.embedder import Embedder, pick_device  # noqa: E402
from worker.images import decode_image, to_model_input  # noqa: E402
from worker.project_model import normalise  # noqa: E402


def balanced_sample(per_class: int, seed: int = 0) -> tuple[list[Path], np.ndarray]:
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[Path]] = {}
    for path, label in labelled_particles():
        by_label.setdefault(label, []).append(path)
    paths, labels = [], []
    for label, items in sorted(by_label.items()):
        for i in rng.permutation(len(items))[:per_class]:
            paths.append(items[i])
            labels.append(label)
    return paths, np.array(labels)


def purity(x: np.ndarray, y: np.ndarray, k: int) -> float:
    assign = KMeans(k, n_init=3, random_state=0).fit_predict(x)
    return float(sum(np.unique(y[assign == c], return_counts=True)[1].max() for c in np.unique(assign)) / len(y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="32,48,64,96,128,224")
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--backbone", default=Settings.from_env().backbone)
    parser.add_argument("--batch-size", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    settings = dataclasses.replace(Settings.from_env(), backbone=args.backbone)
    paths, y = balanced_sample(args.per_class)
    images = [decode_image(p.read_bytes(), settings.image_max_pixels) for p in paths]
    backbone = create_backbone(args.backbone, settings.weights or None)
    device = pick_device(args.device)
    native = np.median([max(im.size) for im in images])
    print(f"{len(paths)} real particles ({dict(zip(*np.unique(y, return_counts=True), strict=True))}), "
          f"median longest side {native:.0f} px; backbone {args.backbone} on {device}")  # fmt: skip
    print(f"{'size':>5} {'img/s':>8} {'LR acc':>7} {'macro-F1':>8} {'k-means purity':>15}")
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        embedder = Embedder(backbone, device, size, args.batch_size)
        pixels = [to_model_input(im, size) for im in images]
        embedder.embed(pixels[: embedder.batch_size])
        start = time.perf_counter()
        features = embedder.embed(pixels)
        rate = len(pixels) / (time.perf_counter() - start)
        x = normalise(features)
        pred = cross_val_predict(LogisticRegression(max_iter=2000, class_weight="balanced"), x, y, cv=5)
        acc, f1 = float(np.mean(pred == y)), float(f1_score(y, pred, average="macro"))
        rows.append((size, rate, acc, f1, purity(x, y, 8)))
        print(f"{size:>5} {rate:>8.1f} {acc:>7.3f} {f1:>8.3f} {rows[-1][4]:>15.3f}", flush=True)
    best = max(r[3] for r in rows)
    good = [r for r in rows if r[3] >= best - 0.01]
    pick = max(good, key=lambda r: r[1])
    print(f"fastest size within 0.01 macro-F1 of the best ({best:.3f}): {pick[0]} px at {pick[1]:.1f} img/s "
          f"({pick[1] / rows[-1][1]:.1f}x the {rows[-1][0]} px rate)")  # fmt: skip


if __name__ == "__main__":
    main()
