"""Postprocessing: per-tag choices become a Label Studio prediction."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from common.label_config import LabelConfig
from worker.project_model import Choice


def build_prediction(choices: Mapping[str, Choice], config: LabelConfig, version: str) -> dict[str, Any]:
    """Valid for the *current* config: tags or labels it no longer has are dropped, never predicted.

    Each item's score is the probability that its choice is right (worker/tag_models.py); the prediction's
    score is its least certain item's, so the Data Manager sorted by prediction score, ascending, shows
    first the tasks whose suggestion is least likely to be right. An empty `result` means
    "processed, no evidence yet"; it is kept in Redis but never sent.

    `cluster` is the task's k-means cluster (`TaskChoices.cluster`, an integer, as Label Studio's prediction
    field is): with *Uncertainty sampling* Label Studio's labelling stream takes first the tasks of the
    clusters the annotator has labelled least, then the lowest score. Left out when the model has none.
    Label Studio 1.23 drops it from a bulk import and from the /predict replies it stores (README).
    """
    result = []
    for tag in config.choices:
        if tag.name not in choices:
            continue
        labels, score = choices[tag.name]
        labels = [label for label in labels if label in tag.labels]
        if not labels:
            continue
        if not tag.multiple:
            labels = labels[:1]
        result.append(
            {
                "id": uuid.uuid4().hex[:12],
                "from_name": tag.name,
                "to_name": tag.to_name,
                "type": "choices",
                "value": {"choices": labels},
                "score": float(score),
            }
        )
    score = min((item["score"] for item in result), default=0.0)
    prediction: dict[str, Any] = {"result": result, "score": round(score, 4), "model_version": version}
    cluster = getattr(choices, "cluster", None)
    if cluster is not None:
        prediction["cluster"] = int(cluster)
    return prediction
