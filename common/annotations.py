"""Turn Label Studio annotation results into per-tag labels the project can learn from."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from common.label_config import LabelConfig

log = logging.getLogger(__name__)


def labels_from_result(result: Any, config: LabelConfig) -> dict[str, list[str]]:
    """Keep only `choices` items whose tag and labels exist in the config; log what is dropped."""
    labels: dict[str, list[str]] = {}
    if not isinstance(result, list | tuple):
        if result:
            log.warning("annotation result is %s, not a list; ignored", type(result).__name__)
        return labels
    for item in result:
        if not isinstance(item, Mapping) or item.get("type") != "choices":
            continue
        tag = config.tag(str(item.get("from_name", "")))
        if tag is None:
            log.warning("annotation names unknown Choices tag %r; ignored", item.get("from_name"))
            continue
        value = item.get("value")
        chosen = value.get("choices") if isinstance(value, Mapping) else None
        if not isinstance(chosen, list):
            log.warning("annotation item for %s has no value.choices list; ignored", tag.name)
            continue
        known = [c for c in chosen if c in tag.labels]
        unknown = [c for c in chosen if c not in tag.labels]
        if unknown:
            log.warning("annotation for %s has unknown labels %s; ignored", tag.name, unknown)
        if not tag.multiple:
            known = known[:1]
        if known:
            labels[tag.name] = sorted(set(labels.get(tag.name, [])) | set(known))
    return labels


def annotation_labels(annotation: Mapping[str, Any], config: LabelConfig) -> dict[str, list[str]] | None:
    """None for a cancelled (skipped) annotation, which counts for nothing; {} for one without choices
    (the task is annotated, but teaches no tag)."""
    if annotation.get("was_cancelled"):
        return None
    return labels_from_result(annotation.get("result"), config)
