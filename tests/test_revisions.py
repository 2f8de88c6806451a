"""Which tasks a new model version rewrites in Label Studio, and in which order (common/revisions.py)."""

from __future__ import annotations

import time

import pytest

from common.revisions import FRONTIER, SCORE_MARGIN, by_urgency, labels_digest, misleads, shown_as
from common.store import STALE, Shown, Store


def prediction(label: str, score: float, tag: str = "organism_type") -> dict:
    item = {"id": "x", "from_name": tag, "to_name": "image", "type": "choices", "value": {"choices": [label]}}
    return {"result": [item], "score": score, "model_version": "m-v0002-e"}


def test_the_digest_is_the_labels_per_tag_whatever_the_ids_order_and_scores():
    a = prediction("Debris", 0.3)
    b = {"result": [{**a["result"][0], "id": "other", "score": 0.9}], "score": 0.9}
    assert labels_digest(a) == labels_digest(b)
    assert labels_digest(a) != labels_digest(prediction("Plankton", 0.3))
    assert labels_digest(a) != labels_digest(prediction("Debris", 0.3, tag="shape"))


def test_only_a_changed_label_or_a_score_moved_beyond_the_margin_misleads():
    shown = shown_as("m-v0001-e", prediction("Debris", 0.50))
    assert not misleads(prediction("Debris", 0.50 + SCORE_MARGIN * 0.9), shown)
    assert misleads(prediction("Debris", 0.50 + SCORE_MARGIN * 1.1), shown)
    assert misleads(prediction("Plankton", 0.50), shown)
    assert misleads(prediction("Debris", 0.5), None)
    assert misleads(prediction("Debris", 0.5), STALE)
    assert not misleads({"result": [], "score": 0.0}, None)  # no evidence: nothing to show


def test_blank_tasks_come_first_then_label_changes_then_score_moves_the_next_handed_out_first():
    shown = {
        1: shown_as("v1", prediction("Debris", 0.9)),  # labels change, confident
        2: shown_as("v1", prediction("Debris", 0.2)),  # labels change, uncertain
        3: shown_as("v1", prediction("Debris", 0.9)),  # the score drops
        4: shown_as("v1", prediction("Debris", 0.5)),  # unchanged
        6: Shown("v1", 0.4, labels_digest(prediction("Debris", 0.4))),  # the score rises, from uncertain
    }
    new = {
        1: prediction("Plankton", 0.8),
        2: prediction("Plankton", 0.6),
        3: prediction("Debris", 0.3),
        4: prediction("Debris", 0.52),
        5: prediction("Debris", 0.7),  # shows nothing yet
        6: prediction("Debris", 0.9),
        7: {"result": [], "score": 0.0},
    }
    # Every task shown is on the frontier here. Ids 1, 2, 3, 4, 6; scores shown from the lowest: 2, 6, 4, 1, 3.
    # Labels change on 1 (first by id) and 2 (first by score): the less certain first; scores move on 6
    # (second by score) and 3 (third by id).
    assert by_urgency(new, shown) == ([5, 2, 1, 6, 3], [])


def test_the_frontier_is_urgent_and_the_rest_waits_for_the_window(clean_redis):
    # Label Studio shows 3 x FRONTIER tasks, ids 1.., scores falling with the id: the lowest ids and the lowest
    # scores are the frontier (what sequential and uncertainty sampling hand out next).
    n = 3 * FRONTIER
    shown = {t: shown_as("v1", prediction("Debris", 0.9 - t / (2 * n))) for t in range(1, n + 1)}
    middle = FRONTIER + 50
    new = {
        1: prediction("Debris", 0.2),  # its score moves, lowest id
        n: prediction("Plankton", 0.9),  # its label changes, lowest score shown
        middle: prediction("Plankton", 0.9),  # its label changes, away from the frontier
        middle + 1: prediction("Debris", 0.1),  # its score moves, away from the frontier
        n + 1: prediction("Debris", 0.5),  # shows nothing yet
        2: prediction("Debris", 0.9 - 2 / (2 * n)),  # unchanged
    }
    now, later = by_urgency(new, shown)
    assert now == [n + 1, n, 1] and sorted(later) == [middle, middle + 1]
    store = Store(clean_redis, "test-space")
    first, opened = store.refresh_due(7, 0.5)
    assert first > time.time() + 0.4 and opened
    # A later refit's moves join the same write, and send no second deliverer.
    assert store.refresh_due(7, 0.5) == (pytest.approx(first, abs=1e-3), False)
    time.sleep(0.6)
    again, opened = store.refresh_due(7, 0.5)
    assert again > first + 0.5 and opened  # the window passed: the next move opens another


def test_the_task_handed_out_next_is_written_before_the_rest_of_the_frontier():
    """A young model relabels much of the frontier. The lowest id (what sequential sampling hands out next) and
    the lowest score shown (what uncertainty sampling hands out) are written first, even the most certain
    change of all; the rest of the frontier follows, each by its place (the less certain first on a tie)."""
    n = 3 * FRONTIER
    shown = {t: shown_as("v1", prediction("Debris", 0.9 - t / (2 * n))) for t in range(1, n + 1)}
    new = {t: prediction("Plankton", 0.3 + t / (10 * n)) for t in range(1, n + 1)}
    new[1] = prediction("Plankton", 0.95)  # the most certain change of all
    now, later = by_urgency(new, shown)
    assert set(now[:2]) == {1, n} and now[2:4] == [2, n - 1]
    assert len(now) == 2 * FRONTIER and len(later) == n - 2 * FRONTIER
