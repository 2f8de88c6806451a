"""What test-time augmentation costs on this machine: the worker's Embedder (TorchScript-frozen on CPU, every
core as torch threads) over real FlowCam particles already decoded and resized, per TTA setting: images/s
(best of `--passes`) and CPU milliseconds per image (this process, all its threads; less disturbed by
other work on a shared machine than the wall clock).

    python bench/tta_cost.py [--tta 1,2,4,8] [--images 256] [--size 224] [--passes 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.settings import Settings  # noqa: E402
from tests.helpers import DATA  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tta", default="1,2,4,8")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()

    import torch

    from worker.backbones import create_backbone
    from worker.embedder import Embedder
    from worker.images import decode_image, to_model_input

    settings = Settings.from_env()
    paths = sorted((DATA / "flowcam" / "particles").glob("*.png"))[: args.images]
    pixels = [to_model_input(decode_image(p.read_bytes(), settings.image_max_pixels), args.size) for p in paths]
    backbone = create_backbone("efficientnet-lite0")
    print(f"| TTA | images/s (best of {args.passes}) | CPU ms per image | × TTA 1 |")
    print("| ---: | ---: | ---: | ---: |")
    base = 0.0
    for tta in (int(t) for t in args.tta.split(",")):
        embedder = Embedder(backbone, torch.device("cpu"), args.size, 32, tta=tta)
        embedder.embed(pixels[:32])  # warm-up
        rates, cpu = [], []
        for _ in range(args.passes):
            wall, proc = time.perf_counter(), time.process_time()
            embedder.embed(pixels)
            rates.append(len(pixels) / (time.perf_counter() - wall))
            cpu.append(1000 * (time.process_time() - proc) / len(pixels))
        ms = min(cpu)
        base = base or ms
        print(f"| {tta} | {max(rates):.1f} | {ms:.1f} | {ms / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
