"""What Label Studio shows of the backend's predictions, read through its API, against what the backend's
current model version answers (Redis)."""

from __future__ import annotations

from typing import Any

from common.revisions import labels_digest, misleads
from common.store import Shown, Store

from .label_studio import LabelStudioClient


def live_rows(predictions: list[dict[str, Any]], live: str) -> list[dict[str, Any]]:
    return [p for p in predictions if p["model_version"] == live]


def current_answers_shown(
    label_studio: LabelStudioClient, store: Store, project: int, tasks: list[int]
) -> dict[int, list[dict[str, Any]]] | None:
    """Each task's predictions in Label Studio, if every task holds exactly one of the live version and it
    carries the current model version's answer (its labels, its score within the margin); otherwise None."""
    live, version = store.live_version(), store.current_version(project)
    answers = store.predictions(project, version, tasks)
    found = {}
    for task in tasks:
        predictions = label_studio.task_predictions(task)
        mine = live_rows(predictions, live)
        if len(mine) != 1 or task not in answers:
            return None
        held = Shown(version, float(mine[0].get("score") or 0), labels_digest(mine[0]))
        if misleads(answers[task], held):
            return None
        found[task] = predictions
    return found
