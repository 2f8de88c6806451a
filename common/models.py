"""Names that the API and the workers must agree on without loading any model."""

from __future__ import annotations

from common.settings import DEFAULT_IMAGE_SIZE, Settings


def image_size(settings: Settings) -> int:
    return settings.image_size or DEFAULT_IMAGE_SIZE.get(settings.backbone, 224)


def embedding_space(settings: Settings) -> str:
    """Embeddings are comparable only within one backbone at one input size and one test-time augmentation;
    versions name all three (no TTA adds nothing, so that spaces embedded before it existed stay valid)."""
    tta = f"-tta{settings.tta}" if settings.tta > 1 else ""
    return f"{settings.backbone}-{image_size(settings)}px{tta}"
