"""The symmetries of a square: the 8 rotations by quarter turns and their mirror images.

A particle in a flow cell or under a camera has no up: the same organism turned or mirrored is the same
class. A backbone trained on photographs of the world is not invariant to that, so averaging its
embeddings of a particle under these transforms (`TTA`, test-time augmentation) gives each particle one
embedding whatever the orientation it happened to pass in. The input is padded to a square before it
reaches the model (worker/images.py), so every one of these is exact: no pixel is lost or invented.
"""

from __future__ import annotations

import numpy as np
import torch

# (quarter turns, mirrored first): identity first, so the first `k` of them are a meaningful subset.
TRANSFORMS: tuple[tuple[int, bool], ...] = (
    (0, False), (2, False), (0, True), (2, True), (1, False), (3, False), (1, True), (3, True),
)  # fmt: skip
SUBSETS = {1: "identity", 2: "identity and a half turn", 4: "the half turns, mirrored or not", 8: "all eight"}


def transforms(count: int) -> tuple[tuple[int, bool], ...]:
    """The first `count` transforms (1, 2, 4 or 8): each subset of this order is closed under the half turn
    and, from 4 on, under mirroring."""
    if count not in SUBSETS:
        raise ValueError(f"TTA takes 1, 2, 4 or 8 transforms, not {count}")
    return TRANSFORMS[:count]


def apply_numpy(image: np.ndarray, transform: tuple[int, bool]) -> np.ndarray:
    """`image`: (side, side, channels)."""
    turns, mirrored = transform
    out = image[:, ::-1] if mirrored else image
    return np.ascontiguousarray(np.rot90(out, turns, axes=(0, 1)))


def apply_torch(batch: torch.Tensor, transform: tuple[int, bool]) -> torch.Tensor:
    """`batch`: (n, channels, side, side); the same transform as `apply_numpy` on each image."""
    turns, mirrored = transform
    out = torch.flip(batch, dims=(3,)) if mirrored else batch
    return torch.rot90(out, turns, dims=(2, 3)) if turns else out
