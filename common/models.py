"""Names that the API and the workers must agree on without loading any model."""

from __future__ import annotations

from common.settings import Settings

# efficientnet-lite0: measured with bench/input_size.py on three kinds of labelled data (README "Input
# size"): 224 px gave the most accurate suggestions on average, and no smaller size came within 0.01 of it.
# The ResNets could not be measured here (no ImageNet or CEFAS weights on this machine); they were trained
# at 224 px too.
DEFAULT_IMAGE_SIZE = {"efficientnet-lite0": 224, "resnet18": 224, "resnet50": 224, "resnet50-cefas": 224}


def image_size(settings: Settings) -> int:
    return settings.image_size or DEFAULT_IMAGE_SIZE.get(settings.backbone, 224)


def embedding_space(settings: Settings) -> str:
    """Embeddings are comparable only within one backbone at one input size; versions name both."""
    return f"{settings.backbone}-{image_size(settings)}px"
