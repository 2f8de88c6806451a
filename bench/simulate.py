"""One simulated project: the backend fitted as a refit fits it, the references on the same annotations, both
scored on the tasks nobody annotated."""

from __future__ import annotations

import time
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np
from protocol import Project
from references import REFERENCES, run_references
from scoring import score

from common.label_config import LabelConfig, parse_label_config
from worker.learning import FeatureSpace, fit_space
from worker.project_model import ProjectModel, fit_project_model
from worker.results import build_prediction

TAG = "class"


def label_config(classes: list[str]) -> LabelConfig:
    choices = "".join(f"<Choice value={quoteattr(c)}/>" for c in classes)
    return parse_label_config(
        '<View><Image name="image" value="$image"/>'
        f'<Choices name="{TAG}" toName="image" choice="single">{choices}</Choices></View>'
    )


def fit_backend(features: np.ndarray, truth: list[str], config: LabelConfig, labelled: np.ndarray,
                seed: int = 0) -> tuple[ProjectModel, float]:  # fmt: skip
    """Fit as a refit does: every task of the project, the labelled ones' labels; Label Studio's task ids
    are the rows + 1."""
    task_ids = list(range(1, len(truth) + 1))
    labels = {int(i) + 1: {TAG: [truth[i]]} for i in labelled}
    start = time.perf_counter()
    model = fit_project_model("", features, task_ids, labels, config, seed=seed)
    return model, time.perf_counter() - start


def answers(model: ProjectModel, features: np.ndarray, config: LabelConfig) -> tuple[list, list, list]:
    """What Label Studio is sent for these rows: the choice, its score, and the prediction's cluster."""
    predicted: list[str | None] = []
    scores: list[float | None] = []
    clusters: list[int | None] = []
    for choices in model.predict(features, None, ()):
        prediction = build_prediction(choices, config, "")
        items = [r for r in prediction["result"] if r["from_name"] == TAG]
        predicted.append(items[0]["value"]["choices"][0] if items else None)
        scores.append(float(items[0]["score"]) if items else None)
        clusters.append(prediction.get("cluster"))
    return predicted, scores, clusters


def backend_answers(
    features: np.ndarray, truth: list[str], config: LabelConfig, labelled: np.ndarray, ask: np.ndarray, seed: int = 0
) -> tuple[list[str | None], list[float | None], Any, float]:
    model, fit_s = fit_backend(features, truth, config, labelled, seed)
    predicted, scores, _ = answers(model, features[ask], config)
    return predicted, scores, model, fit_s


def backend_space(features: np.ndarray) -> np.ndarray:
    """The backend's own transform of a project's features (worker/learning.py `FeatureSpace.full`: signed
    square root, unit length, centred on the project's mean, unit length), for the references."""
    space: FeatureSpace = fit_space(features, np.zeros(len(features), bool), 0)[0]
    return space.full(features)


def run_project(
    features: np.ndarray, truth: list[str], project: Project, seed: int, references: bool = True
) -> dict[str, Any]:
    """`features`, `truth`: the whole data set; the project is `project.rows` of it."""
    x = features[project.rows]
    labels = [truth[i] for i in project.rows]
    classes = sorted(set(labels))
    config = label_config(classes)
    rest_truth = [labels[i] for i in project.rest]
    y = np.array([labels[i] for i in project.annotated])
    predicted, scores, model, fit_s = backend_answers(x, labels, config, project.annotated, project.rest)
    out: dict[str, Any] = {
        "seed": seed,
        "tasks": len(labels),
        "annotated": len(project.annotated),
        "annotated_classes": len(set(y.tolist())),
        "evaluated": len(project.rest),
        "backend": score(rest_truth, predicted, scores, classes),
        "evidence": model.stats.get("evidence", {}).get(TAG, {}),
        "fit_seconds": fit_s,
        "chosen": {},
    }
    if references:
        for name, (answer, chosen) in run_references(backend_space(x), project.annotated, project.rest, y,
                                                     seed).items():  # fmt: skip
            out[name] = score(rest_truth, *answer.predictions(), classes)
            out["chosen"][name] = str(chosen)
    return out


__all__ = ["REFERENCES", "TAG", "answers", "backend_answers", "fit_backend", "label_config", "run_project"]
