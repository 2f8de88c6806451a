"""The worker's CUDA path, checked and measured on a GPU machine (run by bench/gpu.sh).

Checks: the embedder takes the CUDA path (bf16 autocast, channels_last, pinned memory); a batch's
outputs equal one-by-one outputs, and CUDA outputs equal CPU outputs, within bf16 tolerance (cosine).
Measures: model-only images/s per batch size at each input size, for images at that size and for particles
at their own size resized on the card (the worker's layout), and the batch size the worker picks.

    python bench/gpu_check.py [--backbones efficientnet-lite0,resnet50] [--sizes 64,224] [--count 2048]

resnet50 runs with randomly initialised weights when no ImageNet file is in the torch cache: speed does
not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.backbones import BackboneError, create_backbone  # noqa: E402
from worker.embedder import Embedder, default_batch_size  # noqa: E402
from worker.images import to_model_input  # noqa: E402
from worker.project_model import normalise  # noqa: E402


def backbone_for(name: str):
    try:
        return create_backbone(name)
    except BackboneError:
        import torchvision

        path = Path(tempfile.gettempdir()) / f"{name}-random.pth"
        torch.save(getattr(torchvision.models, name)(weights=None).state_dict(), path)
        print(f"  ({name}: no ImageNet weights here, random weights from {path})")
        return create_backbone(name, str(path))


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    return float((normalise(a) * normalise(b)).sum(axis=1).min())


def images(count: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (64, size, size, 3), dtype=np.uint8)
    return [base[i % 64] for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="efficientnet-lite0,resnet50")
    parser.add_argument("--sizes", default="64,224")
    parser.add_argument("--batches", default="32,64,128,256,512")
    parser.add_argument("--count", type=int, default=2048)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    cuda = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(cuda)}, torch {torch.__version__}, bf16 {torch.cuda.is_bf16_supported()}")
    for name in args.backbones.split(","):
        backbone = backbone_for(name)
        for size in [int(s) for s in args.sizes.split(",")]:
            sample = images(64, size)
            on_cpu = Embedder(backbone, torch.device("cpu"), size, 16)  # before the CUDA one moves the model
            cpu = on_cpu.embed(sample[:16])
            small = [to_model_input(Image.fromarray(im[: 16 + i % 48, : 16 + i % 48]), size, resize=False)
                     for i, im in enumerate(sample)]  # fmt: skip
            on_host = on_cpu.embed([to_model_input(Image.fromarray(im), size) for im in small[:16]])
            embedder = Embedder(backbone, cuda, size)
            assert embedder.autocast_dtype == torch.bfloat16, embedder.autocast_dtype
            batched = embedder.embed(sample)
            single = np.concatenate([embedder.embed([im]) for im in sample[:16]])
            print(f"{name} {size}px: default batch {default_batch_size(cuda, size)}; "
                  f"cosine batch-vs-single min {cosine_min(batched[:16], single):.4f}, "
                  f"cuda(bf16)-vs-cpu(fp32) min {cosine_min(batched[:16], cpu):.4f}")  # fmt: skip
            assert cosine_min(batched[:16], single) > 0.99
            assert cosine_min(batched[:16], cpu) > 0.98
            assert embedder.resize_on_device
            on_card = embedder.embed(small)
            print(f"  resized on the card ({len({im.shape[0] for im in small})} sides in a batch) vs on the host: "
                  f"cosine min {cosine_min(on_card[:16], on_host):.4f}")  # fmt: skip
            assert cosine_min(on_card[:16], on_host) > 0.98
            data = images(args.count, size)
            # and the worker's layout: particles at their own size (48 sides here), resized on the card
            mixed = [im[: 16 + i % 48, : 16 + i % 48] for i, im in enumerate(data)]
            for layout, batch_images in ((f"images at {size} px", data), ("particles at 16-63 px", mixed)):
                for batch in [int(b) for b in args.batches.split(",")]:
                    embedder.batch_size = batch
                    embedder.embed(batch_images[: batch * 2])
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    embedder.embed(batch_images)
                    torch.cuda.synchronize()
                    rate = len(batch_images) / (time.perf_counter() - start)
                    print(f"  batch {batch:>4}: {rate:>9.0f} images/s model-only, {layout}")
        del backbone
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
