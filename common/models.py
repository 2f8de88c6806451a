"""Names that the API and the workers must agree on without loading any model."""

from __future__ import annotations

from common.settings import Settings

# efficientnet-lite0: measured with bench/input_size.py (README "Input size"). The ResNets could not be
# measured here (no ImageNet or CEFAS weights on this machine): same stride-32 design, same default.
DEFAULT_IMAGE_SIZE = {"efficientnet-lite0": 48, "resnet18": 48, "resnet50": 48, "resnet50-cefas": 48}


def image_size(settings: Settings) -> int:
    return settings.image_size or DEFAULT_IMAGE_SIZE.get(settings.backbone, 48)


def embedding_space(settings: Settings) -> str:
    """Embeddings are comparable only within one backbone at one input size; versions name both."""
    return f"{settings.backbone}-{image_size(settings)}px"
