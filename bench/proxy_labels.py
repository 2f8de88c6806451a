"""Labels measured from the pixels of real FlowCam particles, for benchmarks that need classes.

The shared particles carry no labels. Their outline does: a particle's elongation (ratio of the principal
axes of its dark mask) separates fibres and filaments from round clumps, which is what the `shape` tag
of the real project asks (Rod-like / Round). `bench/quality.py flowcam-shape` and `bench/input_size.py`
use these 2,100 particles as one labelled data set among several (beside the hand-labelled ZooLake
classes), not as the judge: a label computed from the outline is easier than a taxon.

    python bench/proxy_labels.py OUT_DIR [--limit N]    # OUT_DIR/<class>/<file> symlinks
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers import DATA  # noqa: E402

PARTICLES = DATA / "flowcam" / "particles"


def elongation(path: Path) -> float | None:
    grey = np.asarray(Image.open(path).convert("L"), np.float32)
    background = np.median(np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]]))
    mask = grey < background - 25
    if mask.sum() < 12:
        return None
    ys, xs = np.nonzero(mask)
    cov = np.cov(np.stack([xs, ys]).astype(np.float64))
    small, large = np.sort(np.linalg.eigvalsh(cov))
    return float(np.sqrt(large / max(small, 1e-6)))


def proxy_label(path: Path) -> str | None:
    """'Rod-like' (elongation >= 3), 'Round' (<= 1.5), None in between or when no particle is found."""
    e = elongation(path)
    if e is None:
        return None
    if e >= 3.0:
        return "Rod-like"
    if e <= 1.5:
        return "Round"
    return None


def labelled_particles(limit: int = 0, folder: Path = PARTICLES) -> list[tuple[Path, str]]:
    out = []
    for path in sorted(folder.glob("*.png")):
        label = proxy_label(path)
        if label:
            out.append((path, label))
        if limit and len(out) >= limit:
            break
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--limit", type=int, default=0)
    args = parser.parse_args()
    counts: dict[str, int] = {}
    for path, label in labelled_particles(args.limit):
        (args.out / label).mkdir(parents=True, exist_ok=True)
        link = args.out / label / path.name
        if not link.exists():
            link.symlink_to(path)
        counts[label] = counts.get(label, 0) + 1
    print(f"{args.out}: {counts}")


if __name__ == "__main__":
    main()
