"""Test-time augmentation: the 8 symmetries of the square, in numpy and in torch alike, and the embedder's
mean over them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.models import embedding_space
from common.settings import Settings, SettingsError
from worker.backbones import create_backbone
from worker.dihedral import TRANSFORMS, apply_numpy, apply_torch, transforms
from worker.embedder import Embedder

SIZE = 32


def test_the_eight_transforms_are_the_eight_symmetries_of_the_square():
    image = np.arange(3 * 3 * 1).reshape(3, 3, 1)
    seen = {apply_numpy(image, t).tobytes() for t in TRANSFORMS}
    assert len(seen) == 8
    assert np.array_equal(apply_numpy(image, TRANSFORMS[0]), image)  # the first is the image as it is
    # each subset is closed under the half turn: a particle and itself upside down weigh the same
    for count in (2, 4, 8):
        subset = {apply_numpy(image, t).tobytes() for t in transforms(count)}
        assert {apply_numpy(np.frombuffer(b, image.dtype).reshape(image.shape), (2, False)).tobytes()
                for b in subset} == subset  # fmt: skip


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_numpy_and_torch_turn_the_same_way(transform):
    image = np.random.default_rng(0).integers(0, 255, (5, 5, 3), dtype=np.uint8)
    batch = torch.from_numpy(image).permute(2, 0, 1)[None]
    turned = apply_torch(batch, transform)[0].permute(1, 2, 0).numpy()
    assert np.array_equal(turned, apply_numpy(image, transform))


def test_only_1_2_4_or_8_transforms():
    with pytest.raises(ValueError):
        transforms(3)
    with pytest.raises(SettingsError):
        Settings.from_env({"TTA": "3"})
    assert Settings.from_env({"TTA": "8"}).tta == 8


def test_the_embedder_averages_the_embeddings_of_the_transforms():
    backbone = create_backbone("efficientnet-lite0")
    plain = Embedder(backbone, torch.device("cpu"), SIZE, batch_size=4, torchscript=False)
    tta = Embedder(backbone, torch.device("cpu"), SIZE, batch_size=4, torchscript=False, tta=4)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(3)]
    expected = np.mean([plain.embed([apply_numpy(i, t) for i in images]) for t in transforms(4)], axis=0)
    np.testing.assert_allclose(tta.embed(images), expected, rtol=1e-4, atol=1e-4)
    # a turned particle gets the same embedding: the mean runs over the same set of images
    turned = [apply_numpy(i, (2, True)) for i in images]
    np.testing.assert_allclose(tta.embed(turned), tta.embed(images), rtol=1e-4, atol=1e-4)


def test_tta_starts_an_embedding_space_of_its_own():
    assert embedding_space(Settings.from_env({"TTA": "1"})) == "efficientnet-lite0-224px"
    assert embedding_space(Settings.from_env({"TTA": "8"})) == "efficientnet-lite0-224px-tta8"
