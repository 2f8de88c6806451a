"""Names that the API and the workers must agree on without loading any model."""

from __future__ import annotations

from common.settings import Settings

# Measured in bench/input_size.py: see README "Input size".
DEFAULT_IMAGE_SIZE = {"efficientnet-lite0": 64, "resnet18": 64, "resnet50": 64, "resnet50-cefas": 64}


def image_size(settings: Settings) -> int:
    return settings.image_size or DEFAULT_IMAGE_SIZE.get(settings.backbone, 64)


def embedding_space(settings: Settings) -> str:
    """Embeddings are comparable only within one backbone at one input size; versions name both."""
    return f"{settings.backbone}-{image_size(settings)}px"
