"""Which input size to feed the backbone: speed and the quality of the backend's suggestions, per size, on
more than one kind of data.

- **Speed**: model-only images/s (the worker's Embedder: TorchScript-frozen on CPU, bf16 on CUDA; images
  already decoded and resized; one process with every core as torch threads; the best of `--passes` over
  `--speed-images` real images of both kinds), and the CPU time per image, which other work on a shared
  machine disturbs far less than the wall clock.
- **Quality**: the backend's accuracy and macro-F1 (`fit_project_model` on every task, answers for the tasks
  not annotated, as bench/quality.py measures them) at 5%, 10% and 20% annotated, mean over `--seeds`
  random annotated subsets, on each data set: `zoolake` (35 lake plankton classes, photographs of 24 to
  2,200 px), `zoolake-taxa` (its 27 taxa), `flowcam-shape` (2,100 small FlowCam particles, median 28 px,
  with a proxy shape label from their outline). Features are cached under `.bench-data/features/`.

The summary line ranks sizes by the mean accuracy over data sets and fractions, and names the fastest size
within 0.01 of the best.

    python bench/input_size.py [--sizes 32,48,64,96,128,160,224] [--seeds 10] [--device cpu]
                               [--speed-only] [--datasets zoolake,zoolake-taxa,flowcam-shape] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common.settings import Settings  # noqa: E402
from tests.helpers import DATA  # noqa: E402

FRACTIONS = (0.05, 0.1, 0.2)


def speed(paths: list[Path], backbone_name: str, size: int, device: str, passes: int, batch: int) -> dict[str, float]:
    """Best wall-clock images/s over the passes, and CPU milliseconds per image (this process, all its
    threads): on a shared machine the second moves far less when other work takes the cores."""
    import torch

    from worker.backbones import create_backbone
    from worker.embedder import Embedder, pick_device
    from worker.images import decode_image, to_model_input

    settings = Settings.from_env()
    dev = pick_device(device)
    embedder = Embedder(create_backbone(backbone_name, settings.weights or None), dev, size, batch)
    resize = not embedder.resize_on_device  # as the worker's download threads leave them
    images = [decode_image(p.read_bytes(), settings.image_max_pixels) for p in paths]
    pixels = [to_model_input(img, size, resize=resize) for img in images]
    embedder.embed(pixels[: embedder.batch_size])  # warm-up
    rates, cpu = [], []
    for _ in range(passes):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start, start_cpu = time.perf_counter(), time.process_time()
        embedder.embed(pixels)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        rates.append(len(pixels) / (time.perf_counter() - start))
        cpu.append(1000 * (time.process_time() - start_cpu) / len(pixels))
    return {"images_per_s": max(rates), "cpu_ms_per_image": min(cpu)}


def speed_sample(count: int) -> list[Path]:
    """Real images of both kinds (FlowCam particles, ZooLake photographs where present), without labels:
    all a GPU machine needs."""
    suffixes = {".png", ".jpg", ".jpeg"}
    pool = sorted(p for p in (DATA / "flowcam" / "particles").glob("*.png"))
    zoolake = DATA / "labelled" / "zoolake"
    if zoolake.is_dir():
        pool += sorted(p for p in zoolake.rglob("*") if p.suffix.lower() in suffixes)
    rng = np.random.default_rng(0)
    return [pool[i] for i in sorted(rng.choice(len(pool), min(count, len(pool)), replace=False))]


def quality(features: np.ndarray, truth: list[str], seeds: int) -> dict[str, dict[str, float]]:
    from scoring import score
    from simulate import backend_answers, label_config

    classes = sorted(set(truth))
    config = label_config(classes)
    n = len(truth)
    out = {}
    for fraction in FRACTIONS:
        acc, f1 = [], []
        for seed in range(seeds):
            rng = np.random.default_rng([seed, round(fraction * 1_000_000)])  # the splits of bench/quality.py
            order = rng.permutation(n)
            k = int(min(n - 1, max(1, round(fraction * n))))
            annotated, rest = np.sort(order[:k]), np.sort(order[k:])
            predicted, scores, _, _ = backend_answers(features, truth, config, annotated, rest)
            s = score([truth[i] for i in rest], predicted, scores, classes)
            acc.append(s["accuracy"])
            f1.append(s["macro_f1"])
        out[str(fraction)] = {"accuracy": statistics.fmean(acc), "macro_f1": statistics.fmean(f1)}
    return out


def main() -> None:
    warnings.filterwarnings("ignore", module="sklearn")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="32,48,64,96,128,160,224")
    parser.add_argument("--datasets", default="zoolake,zoolake-taxa,flowcam-shape")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--backbone", default=Settings.from_env().backbone)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=0, help="0: the worker's default for the device")
    parser.add_argument("--speed-images", type=int, default=512)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--quality-from", type=Path, help="reuse the quality of an earlier --json run")
    parser.add_argument("--speed-only", action="store_true", help="no quality (a GPU machine without the cache)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    datasets = []
    if not args.speed_only:
        from datasets import load_dataset

        datasets = [load_dataset(name) for name in args.datasets.split(",")]
    sample = speed_sample(args.speed_images)
    import torch

    print(f"backbone {args.backbone}, device {args.device}, torch threads {torch.get_num_threads()}; speed on "
          f"{len(sample)} real images (FlowCam particles and ZooLake photographs)")  # fmt: skip
    rows: list[dict[str, Any]] = []
    for size in sizes:  # every speed first, while nothing else of this script runs
        measured = speed(sample, args.backbone, size, args.device, args.passes, args.batch_size)
        rows.append({"size": size, **measured})
        print(f"{size} px: {measured['images_per_s']:.0f} images/s, {measured['cpu_ms_per_image']:.2f} ms CPU "
              "per image", flush=True)  # fmt: skip
    earlier = {}
    if args.quality_from:
        earlier = {r["size"]: r for r in json.loads(args.quality_from.read_text())["rows"]}
    if not args.speed_only:
        from datasets import embed

        for row in rows:
            if row["size"] in earlier and all(d.name in earlier[row["size"]] for d in datasets):
                row.update({d.name: earlier[row["size"]][d.name] for d in datasets})
                continue
            for d in datasets:
                features, _ = embed(d, args.backbone, row["size"], args.device)
                row[d.name] = quality(features, d.labels, args.seeds)
            print(json.dumps(row), flush=True)
    print()
    names = [d.name for d in datasets]
    if args.speed_only:
        print("| size | images/s | CPU ms per image |\n| ---: | ---: | ---: |")
        for r in rows:
            print(f"| {r['size']} | {r['images_per_s']:.0f} | {r['cpu_ms_per_image']:.2f} |")
        return
    head = " | ".join(f"{n} 5% / 10% / 20%" for n in names)
    print(f"| size | images/s ({args.device}) | CPU ms per image | {head} | mean accuracy |")
    print("| ---: | ---: | ---: | " + " | ".join("---:" for _ in names) + " | ---: |")
    for r in rows:
        r["mean_accuracy"] = statistics.fmean(r[n][str(f)]["accuracy"] for n in names for f in FRACTIONS)
        cells = " | ".join(" / ".join(f"{r[n][str(f)]['accuracy']:.3f}" for f in FRACTIONS) for n in names)
        print(f"| {r['size']} | {r['images_per_s']:.0f} | {r['cpu_ms_per_image']:.2f} | {cells} | "
              f"{r['mean_accuracy']:.3f} |")  # fmt: skip
    best = max(r["mean_accuracy"] for r in rows)
    fastest = max((r for r in rows if r["mean_accuracy"] >= best - 0.01), key=lambda r: r["images_per_s"])
    print(f"\nbackend accuracy, mean over {args.seeds} seeds per fraction; best mean accuracy {best:.3f}; fastest size "
          f"within 0.01 of it: {fastest['size']} px at {fastest['images_per_s']:.0f} images/s")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"backbone": args.backbone, "device": args.device, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
