"""How good are the backend's suggestions on data no design decision saw, against the strongest simple learners.

The protocol (bench/protocol.py): ZooLake's classes are split once, by a fixed seed, into a development half
(every design decision, bench/design.py) and a report half. This script reports on the **report** half
(`zoolake-report`) and on the FlowCam proxy (`flowcam-shape`, 2,100 particles, two shapes from their
outline, bench/proxy_labels.py), which no decision saw either. `--development` runs it on the development
half instead, to compare with bench/design.py, never to decide anything here.

For each project shape and seed (20), a project is drawn and annotators simulated by labelling a random
subset of it (bench/protocol.py): the whole set at 5%, 10% and 20% annotated, and small projects like a new
user's (6 classes / 60 images and 10 classes / 100 images, 10 and 20 annotations; FlowCam: 100 particles).
On each, with the same features:

- **the backend**: `worker.project_model.fit_project_model` on every task of the project, exactly as a refit
  does, then `model.predict` and `build_prediction` on the other tasks, what Label Studio is sent;
- **references** (bench/references.py), each tuned by 5-fold cross-validation on the annotated tasks:
  logistic regression (as given and standardised), kNN, label spreading, the majority label. They get the
  backend's own feature transform (signed square root, unit length, centred on the project's mean) and the
  same test-time augmentation: what differs is the learner.

Scored on the tasks not annotated: accuracy, macro-F1, ECE of the score per project (mean and worst over
the seeds), pooled over the projects, and the floor a perfectly calibrated score would show on as many
tasks; and how far each project's mean score lies from its accuracy (mean and worst, and how many projects
lie within the 0.15 the end-to-end score test asks of its one project). The backend's paired difference to
every reference: mean, 95% interval, seeds won/tied/lost.
`--calibration` adds the score before issue 26 (Platt, level clamped at one standard error of the held-out
accuracy) on the same fits. `--order` the labelling-order simulation (`order_run`).

    python bench/quality.py [zoolake-report] [flowcam-shape] [--tta 1,8] [--seeds 20] [--order] [--calibration]
                            [--development] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # small fits: more BLAS threads only wait on each other here

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from datasets import Dataset, features_for, load_dataset  # noqa: E402
from protocol import DEVELOPMENT, REPORT, SPLIT_SEED, Shape, draw, small, split_classes, whole  # noqa: E402
from references import NAMES, REFERENCES  # noqa: E402
from scoring import mean_sd, paired, pooled_ece, score  # noqa: E402
from simulate import answers, fit_backend, label_config, run_project  # noqa: E402

from common.settings import Settings  # noqa: E402

SHAPES = {
    "zoolake": (whole(0.05), whole(0.1), whole(0.2), small(6, 60, 10), small(6, 60, 20), small(10, 100, 10),
                small(10, 100, 20), small(6, 60, 10, one_of_each=True), small(10, 100, 20, one_of_each=True)),
    "flowcam-shape": (whole(0.05), whole(0.1), whole(0.2), small(2, 100, 10), small(2, 100, 20),
                      small(2, 100, 10, one_of_each=True)),
}  # fmt: skip
LEARNERS = ("backend", *REFERENCES)
LEVEL_WITHIN = 0.15  # tests/e2e/test_scores_e2e.py: a project's mean score within this of its accuracy


def half_of_zoolake(half: str) -> Dataset:
    zoolake = load_dataset("zoolake")
    keep = set(split_classes(zoolake.classes)[half])
    rows = [i for i, label in enumerate(zoolake.labels) if label in keep]
    return Dataset(f"zoolake-{half}", [zoolake.paths[i] for i in rows], [zoolake.labels[i] for i in rows])


def features(dataset: Dataset, tta: int) -> np.ndarray:
    """EfficientNet-Lite0 at 224 px, averaged over `tta` dihedral transforms: the worker's features with
    `TTA=tta`. A half of ZooLake reads the whole set's cache."""
    if dataset.name.startswith("zoolake-"):
        zoolake = load_dataset("zoolake")
        index = {p: i for i, p in enumerate(zoolake.paths)}
        return features_for(zoolake, ("efficientnet-lite0",), tta)[[index[p] for p in dataset.paths]]
    return features_for(dataset, ("efficientnet-lite0",), tta)


# -- the report -------------------------------------------------------------------------------------------


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "annotated": mean_sd([r["annotated"] for r in runs])[0],
        "annotated_classes": mean_sd([r["annotated_classes"] for r in runs])[0],
        "evaluated": mean_sd([r["evaluated"] for r in runs])[0],
        "seeds": len(runs),
        "fit_seconds": mean_sd([r["fit_seconds"] for r in runs])[0],
    }
    for who in LEARNERS:
        eces = [r[who]["ece"] for r in runs]
        out[who] = {
            "accuracy": mean_sd([r[who]["accuracy"] for r in runs]),
            "macro_f1": mean_sd([r[who]["macro_f1"] for r in runs])[0],
            "ece_mean": mean_sd(eces)[0],
            "ece_worst": max(eces),
            "ece_pooled": pooled_ece([r[who] for r in runs]),
            "ece_floor": mean_sd([r[who]["ece_floor"] for r in runs])[0],
            "mean_score": mean_sd([r[who]["mean_score"] for r in runs])[0],
            "level_gaps": [abs(r[who]["mean_score"] - r[who]["accuracy"]) for r in runs],
            "coverage": mean_sd([r[who]["coverage"] for r in runs])[0],
        }
    out["best_reference"] = max(REFERENCES, key=lambda name: out[name]["accuracy"][0])
    out["backend_minus"] = {
        name: paired([r["backend"]["accuracy"] - r[name]["accuracy"] for r in runs]) for name in REFERENCES
    }
    out["chosen"] = {
        name: dict(Counter(str(r["chosen"].get(name)) for r in runs).most_common(3)) for name in REFERENCES[:-1]
    }
    return out


def level(gaps: list[float]) -> str:
    gaps = [g for g in gaps if g == g]
    if not gaps:
        return "-"
    return f"{np.mean(gaps):.3f} / {max(gaps):.3f} ({sum(g <= LEVEL_WITHIN for g in gaps)}/{len(gaps)})"


def interval(d: dict[str, Any]) -> str:
    return f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] {d['won']}/{d['tied']}/{d['lost']}"


def print_tables(title: str, summary: dict[str, dict[str, Any]]) -> None:
    print(f"\n### {title}\n")
    print("| project | learner | accuracy ± sd | macro-F1 | ECE per project: mean / worst | ECE pooled | floor | "
          "mean score |")  # fmt: skip
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, s in summary.items():
        shape = (f"{label} ({s['annotated']:.0f} annotated, {s['annotated_classes']:.1f} classes, "
                 f"{s['evaluated']:.0f} scored)")  # fmt: skip
        for who in LEARNERS:
            m = s[who]
            name = "**backend**" if who == "backend" else NAMES[who] + (" (best)" if who == s["best_reference"] else "")
            print(f"| {shape} | {name} | {m['accuracy'][0]:.3f} ± {m['accuracy'][1]:.3f} | {m['macro_f1']:.3f} | "
                  f"{m['ece_mean']:.3f} / {m['ece_worst']:.3f} | {m['ece_pooled']:.3f} | {m['ece_floor']:.3f} | "
                  f"{m['mean_score']:.3f} |")  # fmt: skip
    print(f"\nhow far a project's mean score lies from its accuracy (the end-to-end test's criterion): mean / worst "
          f"over the projects (projects within {LEVEL_WITHIN})\n")  # fmt: skip
    print("| project | " + " | ".join(NAMES.get(n, n) for n in LEARNERS) + " |")
    print("| --- |" + " ---: |" * len(LEARNERS))
    for label, s in summary.items():
        print(f"| {label} | " + " | ".join(level(s[who]["level_gaps"]) for who in LEARNERS) + " |")
    print("\nbackend − reference, accuracy: mean [95% interval] seeds won/tied/lost\n")
    print("| project | " + " | ".join(NAMES[n] for n in REFERENCES) + " |")
    print("| --- |" + " ---: |" * len(REFERENCES))
    for label, s in summary.items():
        print(f"| {label} | " + " | ".join(interval(s["backend_minus"][n]) for n in REFERENCES) + " |")
    print()
    for label, s in summary.items():
        print(f"- {label}: references' hyper-parameters (most chosen) {s['chosen']}; backend fit "
              f"{s['fit_seconds']:.2f} s")  # fmt: skip


def calibration_table(title: str, feats: np.ndarray, truth: list[str], shapes: tuple[Shape, ...], seeds: int) -> dict:
    """The score before issue 26 and now, on the same fits (bench/design.py `fitted`)."""
    import calibrators as cal
    from design import fitted
    from scoring import expected_calibration_error

    print(f"\n### {title}: the score before issue 26 and now, on the same fits\n")
    print("| project | before: ECE mean / worst / pooled | now: ECE mean / worst / pooled | accuracy |")
    print("| --- | ---: | ---: | ---: |")
    out = {}
    for shape in shapes:
        fits = [f for seed in range(seeds) if (f := fitted(feats, truth, shape, seed)) is not None]
        rows = {}
        for name, scores_of in (
            ("before", lambda f: cal.current(f.loo_p, f.loo_y, f.p, np.zeros(0))),
            ("now", lambda f: cal.prior_now(f)),
        ):
            s = [scores_of(f) for f in fits]
            eces = [expected_calibration_error(x, f.right) for x, f in zip(s, fits, strict=True)]
            pooled = expected_calibration_error(np.concatenate(s), np.concatenate([f.right for f in fits]))
            rows[name] = (float(np.mean(eces)), float(max(eces)), float(pooled))
        accuracy = float(np.mean([f.right.mean() for f in fits]))
        out[shape.label] = {**rows, "accuracy": accuracy}
        print(f"| {shape.label} | " + " | ".join(" / ".join(f"{v:.3f}" for v in rows[k]) for k in ("before", "now"))
              + f" | {accuracy:.3f} |")  # fmt: skip
    return out


# -- labelling order: Label Studio's uncertainty sampling, the lowest score alone, random ------------------


def order_run(feats: np.ndarray, truth: list[str], fractions: list[float], seed: int, batch: int) -> dict[str, Any]:
    """Annotators label one task at a time; the backend refits after every `batch` labels (what REFIT_EVERY
    does). A fifth of the tasks is held out and never labelled: the accuracy on it after 5%, 10% and 20% of
    the others are labelled measures the model; the suggestions on the tasks not yet labelled are what
    annotators see next. The same random first batch in every arm (nothing is predicted yet), then:

    - `random`: the Data Manager's default order;
    - `score`: the lowest prediction score first (the Data Manager sorted by score, ascending);
    - `label_studio`: Label Studio 1.23's uncertainty sampling (`_try_uncertainty_sampling`): the task whose
      prediction `cluster` holds the fewest tasks this annotator has labelled, then the lowest score. A
      labelled task counts in the highest cluster number any of its predictions named (Label Studio takes
      the Max over them).
    """
    n = len(truth)
    classes = sorted(set(truth))
    config = label_config(classes)
    rng = np.random.default_rng([seed, 77])
    perm = rng.permutation(n)
    held = np.sort(perm[: n // 5])
    pool = perm[n // 5 :]
    targets = [int(max(batch, round(f * len(pool)))) for f in fractions]
    out: dict[str, Any] = {"seed": seed, "batch": batch, "pool": len(pool), "held_out": len(held)}
    for arm in ("random", "score", "label_studio"):
        labelled = [int(t) for t in pool[:batch]]
        seen_cluster: dict[int, int] = {}  # task -> the highest cluster number its predictions named
        results = []
        for target in targets:
            while len(labelled) < target:
                take = min(batch, target - len(labelled))
                done = set(labelled)
                left = np.array([t for t in pool if int(t) not in done])
                if arm == "random":
                    labelled += [int(t) for t in left[:take]]
                    continue
                model, _ = fit_backend(feats, truth, config, np.array(labelled), seed)
                _, scores, clusters = answers(model, feats[left], config)
                key = np.array([-1.0 if s is None else s for s in scores])
                if arm == "score":
                    labelled += [int(t) for t in left[np.argsort(key, kind="stable")[:take]]]
                    continue
                for t, c in zip(left, clusters, strict=True):
                    seen_cluster[int(t)] = max(seen_cluster.get(int(t), -(2**62)), int(c))
                cluster_of = dict(zip(left.tolist(), clusters, strict=True))
                solved = Counter(seen_cluster.get(t) for t in labelled)
                available = list(range(len(left)))
                for _ in range(take):  # one at a time: each label changes the cluster counts
                    best = min(available, key=lambda i: (solved[cluster_of[int(left[i])]], key[i], i))
                    available.remove(best)
                    labelled.append(int(left[best]))
                    solved[seen_cluster.get(int(left[best]))] += 1
            model, _ = fit_backend(feats, truth, config, np.array(labelled), seed)
            done = set(labelled)
            left = np.array([t for t in pool if int(t) not in done])
            predicted, scores, _ = answers(model, feats[np.concatenate([held, left])], config)
            on_held = score([truth[i] for i in held], predicted[: len(held)], scores[: len(held)], classes)
            on_left = score([truth[i] for i in left], predicted[len(held) :], scores[len(held) :], classes)
            results.append({
                "labelled": len(labelled),
                "classes_labelled": len({truth[i] for i in labelled}),
                "held_out_accuracy": on_held["accuracy"],
                "suggestions_accuracy": on_left["accuracy"],
            })  # fmt: skip
        out[arm] = results
    return out


def print_order(title: str, runs: list[dict[str, Any]], fractions: list[float]) -> dict[str, Any]:
    print(f"\n### {title}: labelling order\n")
    print(f"{len(runs)} seeds; a refit every {runs[0]['batch']} labels; pool {runs[0]['pool']} tasks, "
          f"{runs[0]['held_out']} held out\n")  # fmt: skip
    print("| labelled | held-out accuracy: random / score / Label Studio | Label Studio − random [95% CI] | "
          "Label Studio − score [95% CI] | classes labelled: random / score / LS | suggestions right: random / "
          "score / LS |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    table = {}
    for j, fraction in enumerate(fractions):
        arms = {arm: [r[arm][j] for r in runs] for arm in ("random", "score", "label_studio")}
        acc = {arm: [x["held_out_accuracy"] for x in rows] for arm, rows in arms.items()}
        vs_random = paired([a - b for a, b in zip(acc["label_studio"], acc["random"], strict=True)])
        vs_score = paired([a - b for a, b in zip(acc["label_studio"], acc["score"], strict=True)])
        row = {
            "labelled": arms["random"][0]["labelled"],
            "held_out": {arm: mean_sd(v)[0] for arm, v in acc.items()},
            "ls_minus_random": vs_random,
            "ls_minus_score": vs_score,
            "classes": {arm: mean_sd([x["classes_labelled"] for x in rows])[0] for arm, rows in arms.items()},
            "suggestions": {arm: mean_sd([x["suggestions_accuracy"] for x in rows])[0] for arm, rows in arms.items()},
        }
        table[fraction] = row
        print(f"| {fraction:.0%} ({row['labelled']}) | " + " / ".join(f"{v:.3f}" for v in row["held_out"].values())
              + f" | {interval(vs_random)} | {interval(vs_score)} | "
              + " / ".join(f"{v:.1f}" for v in row["classes"].values()) + " | "
              + " / ".join(f"{v:.3f}" for v in row["suggestions"].values()) + " |")  # fmt: skip
    return table


def variants_table(dataset: Dataset, shapes: tuple[Shape, ...], seeds: int) -> dict[str, Any]:
    """The backend's accuracy with each feature variant bench/design.py measured on the development half
    (test-time augmentation, other backbones side by side), on this data: paired against TTA 1."""
    from design import lite_weights

    zoolake = load_dataset("zoolake")
    index = {p: i for i, p in enumerate(zoolake.paths)}
    rows = [index[p] for p in dataset.paths]
    lite = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
    variants = {"TTA 1": (lite[:1], 1), "TTA 2": (lite[:1], 2), "TTA 8": (lite[:1], 8),
                "Lite0+Lite1+Lite2, TTA 8": (lite, 8)}  # fmt: skip
    accuracy: dict[str, dict[str, list[float]]] = {}
    for name, (backbones, tta) in variants.items():
        feats = features_for(zoolake, backbones, tta, weights=lite_weights())[rows]
        accuracy[name] = {
            shape.label: [run_project(feats, dataset.labels, draw(dataset.labels, shape, seed), seed,
                                      references=False)["backend"]["accuracy"] for seed in range(seeds)]
            for shape in shapes
        }  # fmt: skip
    print(f"\n### {dataset.name}: the backend's accuracy by features (paired against TTA 1)\n")
    print("| features | " + " | ".join(s.label for s in shapes) + " |")
    print("| --- |" + " ---: |" * len(shapes))
    for name, per in accuracy.items():
        cells = []
        for shape in shapes:
            cell = f"{mean_sd(per[shape.label])[0]:.3f}"
            if name != "TTA 1":
                d = paired([a - b for a, b in zip(per[shape.label], accuracy["TTA 1"][shape.label], strict=True)])
                cell += f" ({d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}])"
            cells.append(cell)
        print(f"| {name} | " + " | ".join(cells) + " |")
    return accuracy


def strip_private(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: ({m: v for m, v in val.items() if not m.startswith("_")} if isinstance(val, dict) else val)
             for k, val in r.items()} for r in runs]  # fmt: skip


def main() -> None:
    warnings.filterwarnings("ignore", module="sklearn")  # one-member classes in a fold, lbfgs notes
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datasets", nargs="*", default=["zoolake-report", "flowcam-shape"])
    parser.add_argument("--development", action="store_true", help="ZooLake's development half instead")
    parser.add_argument("--tta", default="1,8", help="TTA settings to report (worker setting TTA)")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--order", action="store_true", help="also the labelling-order simulation")
    parser.add_argument("--order-seeds", type=int, default=10)
    parser.add_argument("--order-fractions", default="0.05,0.1,0.2")
    parser.add_argument("--calibration", action="store_true", help="also the score before issue 26")
    parser.add_argument("--variants", action="store_true", help="ZooLake: the backend by feature variant, alone")
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args()
    specs = ["zoolake-development"] if args.development else args.datasets
    report: dict[str, Any] = {"split_seed": SPLIT_SEED, "seeds": args.seeds, "results": {}}
    zoolake = load_dataset("zoolake")
    halves = split_classes(zoolake.classes)
    print(f"ZooLake split (seed {SPLIT_SEED}): {DEVELOPMENT} {halves[DEVELOPMENT]}; {REPORT} {halves[REPORT]}")
    for spec in specs:
        dataset = half_of_zoolake(spec.split("-", 1)[1]) if spec.startswith("zoolake-") else load_dataset(spec)
        truth = dataset.labels
        shapes = SHAPES["zoolake" if spec.startswith("zoolake") else spec]
        counts = Counter(truth)
        if args.variants and spec.startswith("zoolake-"):
            report["results"][f"{dataset.name}@variants"] = variants_table(dataset, shapes, args.seeds)
        for tta in (int(t) for t in args.tta.split(",") if t):
            feats = features(dataset, tta)
            title = f"{dataset.name}, EfficientNet-Lite0 at 224 px, TTA {tta}"
            print(f"\n## {title}: {len(truth)} images, {len(counts)} classes ({min(counts.values())} to "
                  f"{max(counts.values())} per class)", flush=True)  # fmt: skip
            start = time.perf_counter()
            runs = {shape.label: [run_project(feats, truth, draw(truth, shape, seed), seed)
                                  for seed in range(args.seeds)] for shape in shapes}  # fmt: skip
            summary = {label: summarise(r) for label, r in runs.items()}
            print(f"{sum(map(len, runs.values()))} simulated projects in {time.perf_counter() - start:.0f} s")
            print_tables(title, summary)
            entry: dict[str, Any] = {"summary": summary, "runs": {k: strip_private(v) for k, v in runs.items()}}
            if args.calibration:
                entry["calibration"] = calibration_table(title, feats, truth, shapes, args.seeds)
            if args.order:
                fractions = [float(f) for f in args.order_fractions.split(",")]
                batch = max(Settings.from_env().refit_every, round(0.01 * len(truth)))
                start = time.perf_counter()
                order_runs = [order_run(feats, truth, fractions, seed, batch) for seed in range(args.order_seeds)]
                entry["order"] = {str(k): v for k, v in print_order(title, order_runs, fractions).items()}
                print(f"\n(order: {time.perf_counter() - start:.0f} s)")
            report["results"][f"{dataset.name}@tta{tta}"] = entry
            sys.stdout.flush()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=float))
        print(f"\nnumbers written to {args.json}")


if __name__ == "__main__":
    main()
