"""Does fine-tuning the backbone's last blocks beat the frozen learner as a campaign grows? The learning curve
on ZooLake at 10% to 80% annotated, on CPU.

EfficientNet-Lite0 at 224 px. Its trunk up to block `--cut` stays frozen; the blocks after it and the 1x1
head convolution are trained on the annotated images (each epoch under 2 of the 8 dihedral transforms drawn
at random, as augmentation), with a linear classifier on the pooled 1280 features, cross-entropy, AdamW, batch norm kept
at its ImageNet statistics. Since the trunk is frozen, its output is computed once per image and transform
and cached (`.bench-data/finetune/`): a refit trains only the last blocks.

Both arms then answer the same way, the backend's own learner (`fit_project_model`, every task of the
project) on each task's embedding averaged over the 8 transforms: the frozen arm on the ImageNet features,
the fine-tuned arm on the features of the fine-tuned blocks (what a fine-tuned model's re-embedding would
give the worker). The fine-tuned classifier's own answer is given too. Accuracy on the tasks not annotated;
paired difference, fine-tuned minus frozen, with its 95% interval; seconds of training per refit (2 shared
cores), and the re-embedding a fine-tuned version needs (the full forward pass per task and transform,
measured here per image).

    python bench/finetune.py --half development --fractions 0.6 --seeds 3 --grid   # choose the recipe
    python bench/finetune.py --half report --fractions 0.1,0.2,0.4,0.6,0.8 --seeds 5
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # numpy for the learner; torch sets its own threads

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from datasets import features_for, load_dataset  # noqa: E402
from protocol import draw, split_classes, whole  # noqa: E402
from scoring import mean_sd, paired  # noqa: E402
from simulate import run_project  # noqa: E402

CACHE = Path(__file__).resolve().parents[1] / ".bench-data" / "finetune"


def trunk_outputs(paths: list[Path], cut: int, size: int = 224) -> np.ndarray:
    """(8, n, C, H, W) float16: the frozen trunk's output (after block `cut`) per dihedral transform."""
    import hashlib

    key = hashlib.sha1("\n".join(map(str, paths)).encode()).hexdigest()[:12]
    path = CACHE / f"lite0-{size}px-cut{cut}-{key}.npy"
    if path.is_file():
        return np.load(path)
    import torch

    from common.settings import Settings
    from worker.backbones import create_backbone
    from worker.dihedral import TRANSFORMS, apply_numpy
    from worker.images import decode_image, to_model_input

    torch.set_num_threads(2)
    net = create_backbone("efficientnet-lite0").model.body.net.eval()
    settings = Settings.from_env()
    pixels = [to_model_input(decode_image(p.read_bytes(), settings.image_max_pixels), size) for p in paths]
    mean, std = 0.498, 0.502
    out = []
    with torch.inference_mode():
        for transform in TRANSFORMS:
            parts = []
            for start in range(0, len(pixels), 32):
                batch = np.stack([apply_numpy(p, transform) for p in pixels[start : start + 32]])
                x = (torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
                x = net._swish(net._bn0(net._conv_stem(x)))
                for block in net._blocks[: cut + 1]:
                    x = block(x)
                parts.append(x.numpy().astype(np.float16))
            out.append(np.concatenate(parts))
    trunk = np.stack(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, trunk)
    return trunk


class Tail:
    """The trainable part: the blocks after `cut`, the head convolution, pooling, and a linear classifier."""

    def __new__(cls, cut: int, classes: int):
        import copy

        import torch
        from torch import nn

        from worker.backbones import create_backbone

        net = create_backbone("efficientnet-lite0").model.body.net

        class _Tail(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.blocks = nn.ModuleList(copy.deepcopy(list(net._blocks[cut + 1 :])))
                self.head = copy.deepcopy(net._conv_head)
                self.bn = copy.deepcopy(net._bn1)
                self.swish = net._swish
                self.classifier = nn.Linear(1280, classes)

            def embed(self, x: torch.Tensor) -> torch.Tensor:
                for block in self.blocks:
                    x = block(x)
                return self.swish(self.bn(self.head(x))).mean(dim=(2, 3))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.classifier(self.embed(x))

        return _Tail()


def fine_tune(trunk: np.ndarray, labelled: np.ndarray, y: np.ndarray, cut: int, epochs: int, lr: float,
              seed: int, per_epoch: int = 2) -> tuple[np.ndarray, np.ndarray, float]:  # fmt: skip
    """Train on the labelled rows, each epoch under `per_epoch` of the 8 transforms drawn at random per image;
    returns every row's fine-tuned embedding (mean over the transforms), the classifier's probabilities, and
    the training seconds."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    torch.set_num_threads(2)
    classes = int(y.max()) + 1
    model = Tail(cut, classes)
    for module in model.modules():  # batch norm keeps ImageNet's statistics: a few dozen images cannot set them
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
            module.requires_grad_(False)
    optimiser = torch.optim.AdamW(
        [{"params": [p for n, p in model.named_parameters() if not n.startswith("classifier") and p.requires_grad],
          "lr": lr}, {"params": model.classifier.parameters(), "lr": lr * 10}],
        weight_decay=1e-4,
    )  # fmt: skip
    x = torch.from_numpy(trunk[:, labelled].astype(np.float32))  # (8, n, C, H, W)
    target = torch.from_numpy(y).long()
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    model.train()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    for _ in range(epochs):
        images = np.tile(np.arange(len(y)), per_epoch)
        turns = rng.integers(0, x.shape[0], len(images))
        order = rng.permutation(len(images))
        for batch in np.array_split(order, max(1, len(order) // 32)):
            optimiser.zero_grad()
            inputs = x[torch.from_numpy(turns[batch]), torch.from_numpy(images[batch])]
            loss = nn.functional.cross_entropy(model(inputs), target[torch.from_numpy(images[batch])])
            loss.backward()
            optimiser.step()
    train_s = time.perf_counter() - start
    model.eval()
    embeddings, probs = [], []
    with torch.inference_mode():
        for t in range(trunk.shape[0]):
            e = model.embed(torch.from_numpy(trunk[t].astype(np.float32)))
            embeddings.append(e.numpy())
            probs.append(torch.softmax(model.classifier(e), dim=1).numpy())
    return np.mean(embeddings, axis=0), np.mean(probs, axis=0), train_s


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore", module="sklearn")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--half", choices=("development", "report"), default="report")
    parser.add_argument("--fractions", default="0.1,0.2,0.4,0.6,0.8")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--cut", type=int, default=14, help="last frozen block (lite0 has 16: 0-15)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--grid", action="store_true", help="try cut 13/14, epochs 8/16 (development only)")
    args = parser.parse_args()

    zoolake = load_dataset("zoolake")
    keep = set(split_classes(zoolake.classes)[args.half])
    rows = np.array([i for i, label in enumerate(zoolake.labels) if label in keep])
    truth = [zoolake.labels[i] for i in rows]
    frozen = features_for(zoolake, ("efficientnet-lite0",), 8)[rows]
    recipes = [(args.cut, args.epochs)]
    if args.grid:
        if args.half != "development":
            raise SystemExit("--grid chooses the recipe: development half only")
        recipes = [(cut, epochs) for cut in (13, 14) for epochs in (8, 16)]
    print(f"ZooLake {args.half} half: {len(rows)} images, {len(keep)} classes; lr {args.lr}", flush=True)
    print("\n| annotated | recipe | frozen learner | fine-tuned learner | fine-tuned − frozen [95% CI] | "
          "fine-tuned classifier | training s per refit |")  # fmt: skip
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for cut, epochs in recipes:
        trunk = trunk_outputs([zoolake.paths[i] for i in rows], cut)
        for fraction in (float(f) for f in args.fractions.split(",")):
            base, tuned, direct, seconds = [], [], [], []
            for seed in range(args.seeds):
                project = draw(truth, whole(fraction), seed)
                base.append(run_project(frozen, truth, project, seed, references=False)["backend"]["accuracy"])
                classes = sorted({truth[i] for i in project.annotated})
                y = np.array([classes.index(truth[i]) for i in project.annotated])
                embedding, probs, train_s = fine_tune(trunk, project.annotated, y, cut, epochs, args.lr, seed)
                tuned.append(run_project(embedding, truth, project, seed, references=False)["backend"]["accuracy"])
                answer = [classes[i] for i in probs[project.rest].argmax(axis=1)]
                direct.append(float(np.mean([a == truth[i] for a, i in zip(answer, project.rest, strict=True)])))
                seconds.append(train_s)
            d = paired([t - b for t, b in zip(tuned, base, strict=True)])
            print(f"| {fraction:.0%} ({len(project.annotated)}) | cut {cut}, {epochs} epochs | "
                  f"{mean_sd(base)[0]:.3f} | {mean_sd(tuned)[0]:.3f} | {d['mean']:+.3f} [{d['ci95'][0]:+.3f}, "
                  f"{d['ci95'][1]:+.3f}] {d['won']}/{d['tied']}/{d['lost']} | {mean_sd(direct)[0]:.3f} | "
                  f"{mean_sd(seconds)[0]:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
