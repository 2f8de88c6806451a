"""Which tasks a new model version changes for the annotator, and in which order Label Studio gets them.

Label Studio holds one prediction per task under the live version name (`Store.live_version`), the
answer of some model version (`keys.shown`). A refit changes the labels of a few tasks and moves every
score a little; writing a row for every task at every refit cost Label Studio about 1.4 ms of CPU a row, and
30 s per annotation in a project of 20,000 tasks (bench/RESULTS.md). So a task's prediction is written again
only where what Label Studio shows would mislead: its labels differ, or its score moved by more than
SCORE_MARGIN (the Data Manager's sort by score and Label Studio's uncertainty sampling read it).
"""

from __future__ import annotations

import hashlib
import heapq
import json
from collections.abc import Mapping
from typing import Any

from common.store import Shown, Store

# Scores are probabilities that the suggestion is right; a move smaller than this changes no decision an
# annotator takes from the sort (and the calibration itself is no finer on a project's few annotations).
SCORE_MARGIN = 0.05
# A young model changes its answer for a third of a project within a few refits, and often changes it back;
# replacing a prediction costs Label Studio about 11 ms (a delete and a write, bench/RESULTS.md). So a change is
# written at once only where the annotator looks next, and elsewhere at most this often, the newest model's.
REFRESH_SECONDS = 120.0
# Where the annotator looks next: the tasks Label Studio hands out first, by its sequential sampling (the lowest
# ids) and by its uncertainty sampling (the lowest scores shown).
FRONTIER = 100
# The first of those, which an annotator may be handed at any moment: revised in place (a PATCH, about 73 ms of
# Label Studio's CPU, against about 11 ms for a delete and a write in bulk), because a task handed out between a
# revision's delete and its write shows nothing. The annotator's next task is what a refit revises first, just
# after their last annotation, so the two meet far more often than chance would have it (bench/RESULTS.md).
NEXT_OUT = 3


def labels_digest(prediction: Mapping[str, Any]) -> str:
    """The suggestion's labels per tag, ids and scores aside."""
    labels = sorted((item["from_name"], sorted(item["value"]["choices"])) for item in prediction.get("result") or [])
    return hashlib.sha1(json.dumps(labels).encode()).hexdigest()[:16]


def shown_as(version: str, prediction: Mapping[str, Any]) -> Shown:
    return Shown(version, round(float(prediction.get("score") or 0.0), 4), labels_digest(prediction))


def relabels(prediction: Mapping[str, Any], shown: Shown) -> bool:
    """The prediction's labels differ from those Label Studio shows (not only its score)."""
    return shown.digest != labels_digest(prediction)


def misleads(prediction: Mapping[str, Any], shown: Shown | None) -> bool:
    """Label Studio would show this task something other than `prediction` says (or nothing at all)."""
    if not prediction.get("result"):
        return False  # no evidence: nothing to show, and what is shown stays until there is
    if shown is None:
        return True
    return relabels(prediction, shown) or abs(shown.score - float(prediction["score"])) > SCORE_MARGIN


def by_urgency(predictions: Mapping[int, Mapping[str, Any]], shown: Mapping[int, Shown]) -> tuple[list[int], list[int]]:
    """The tasks whose prediction Label Studio must get, most urgent first: tasks that show nothing, then
    tasks whose labels change, then score moves. Cut in two: what Label Studio must get now (tasks that show
    nothing, and the frontier: the FRONTIER lowest ids and the FRONTIER lowest scores shown), and the rest
    (every REFRESH_SECONDS). On the frontier, the task Label Studio hands out sooner goes first (its place
    among the lowest ids or among the lowest scores, whichever is earlier): a young model relabels much of
    the frontier, and the task the annotator opens next should not wait behind the rest of it. Elsewhere the
    least certain go first (where the sort by score looks)."""
    soon = handed_out_order(shown, FRONTIER)
    ranked = _ranked(predictions, shown)
    now = [t for rank, _, t in ranked if rank == 0]
    for wanted in (1, 2):
        front = [(soon[t], certainty, t) for rank, certainty, t in ranked if rank == wanted and t in soon]
        now += [t for _, _, t in sorted(front)]
    return now, [t for rank, _, t in ranked if rank > 0 and t not in soon]


def handed_out_order(shown: Mapping[int, Shown], depth: int) -> dict[int, int]:
    """The `depth` tasks Label Studio's sequential sampling hands out first (the lowest ids) and the `depth` its
    uncertainty sampling does (the lowest scores shown), each with its place in the earlier of the two orders.
    `shown`: the unannotated tasks."""
    soon: dict[int, int] = {}
    for order in (heapq.nsmallest(depth, shown), heapq.nsmallest(depth, shown, key=lambda t: shown[t].score)):
        for place, task in enumerate(order):
            soon[task] = min(place, soon.get(task, place))
    return soon


def _ranked(predictions: Mapping[int, Mapping[str, Any]], shown: Mapping[int, Shown]) -> list[tuple[int, float, int]]:
    urgent = []
    for task, prediction in predictions.items():
        if not misleads(prediction, shown.get(task)):
            continue
        held = shown.get(task)
        rank = 0 if held is None else 1 if relabels(prediction, held) else 2
        certainty = float(prediction["score"]) if held is None else min(float(prediction["score"]), held.score)
        urgent.append((rank, certainty, task))
    return sorted(urgent)


def behind(store: Store, pid: int) -> list[int]:
    """Unannotated tasks with features for which Label Studio does not show the current version's answer (or
    the current version has none yet): empty once every write has landed. For benchmarks and tests; it reads
    every prediction of the project."""
    version = store.current_version(pid)
    waiting = sorted(store.featured_tasks(pid) - store.annotated_tasks(pid))
    answers, shown = store.predictions(pid, version, waiting), store.shown(pid, waiting)
    return [t for t in waiting if t not in answers or misleads(answers[t], shown.get(t))]
