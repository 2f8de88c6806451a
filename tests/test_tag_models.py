"""Per-tag learners: single choice over the labels annotated so far, multiple choice one label at a time,
and what a tag without two labels to tell apart gets."""

from __future__ import annotations

import numpy as np

from common.label_config import parse_label_config
from tests.helpers import LABEL_CONFIG
from worker.project_model import fit_project_model
from worker.tag_models import TagLearner, agreement

CONFIG = parse_label_config(LABEL_CONFIG)
MORPHOLOGY = ["Mucilage", "Flagella", "Cilia", "Aerotopes", "Akinetes", "Heterocytes",
              "Theca/test/exoskeletal structures", "Eggs", "Ephippia"]  # fmt: skip


def blobs(n_per: int = 40, dim: int = 24, spread: float = 0.6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (4, dim))
    x = np.concatenate([c + rng.normal(0, spread, (n_per, dim)) for c in centres])
    return x.astype(np.float32), np.repeat(np.arange(4), n_per)


def test_single_choice_learns_the_labels_annotated_and_only_those():
    x, blob = blobs()
    names = np.array(["Plankton", "Debris", "Plankton", "Debris"])[blob]  # two blobs per label
    labels = {i: {"organism_type": [str(names[i])]} for i in range(0, len(x), 5)}
    model = fit_project_model("v", x, list(range(len(x))), labels, CONFIG)
    learner = model.learners["organism_type"]
    assert not learner.multiple and learner.problems[0].classes == ["Debris", "Plankton"]
    predictions = model.predict(x, None, ())
    chosen = [p["organism_type"][0] for p in predictions]
    assert np.mean([c == [n] for c, n in zip(chosen, names, strict=True)]) > 0.95
    assert all(c != ["Not-plankton"] for c in chosen)  # nobody annotated it: never suggested
    assert model.stats["evidence"]["organism_type"]["cv_accuracy"] > 0.9


def test_multiple_choice_learns_each_label_on_its_own():
    """Flagella on blobs 0 and 1, Cilia on blobs 1 and 2, Eggs on every annotated task, Mucilage on none:
    each label is its own present/absent problem, whatever the others do."""
    x, blob = blobs()
    flagella, cilia = np.isin(blob, [0, 1]), np.isin(blob, [1, 2])

    def truth(i: int) -> list[str]:
        return [name for name, on in (("Flagella", flagella[i]), ("Cilia", cilia[i]), ("Eggs", True)) if on]

    labels = {i: {"morphology": truth(i)} for i in range(0, len(x), 4)}
    model = fit_project_model("v", x, list(range(len(x))), labels, CONFIG)
    learner = model.learners["morphology"]
    assert learner.multiple and sorted(p.classes[0] for p in learner.problems) == ["Cilia", "Flagella"]
    n = len(labels)
    assert learner.constant == {"Eggs": (True, (n + 1) / (n + 2))}
    predictions = model.predict(x, None, ())
    right = [set(p["morphology"][0]) == set(truth(i)) for i, p in enumerate(predictions) if "morphology" in p]
    assert len(right) >= 0.95 * len(x) and np.mean(right) > 0.9
    assert all(0.0 < p["morphology"][1] <= 1.0 for p in predictions if "morphology" in p)
    assert 0.9 < model.stats["evidence"]["morphology"]["cv_accuracy"] <= 1.0
    assert set(model.stats["evidence"]["morphology"]["per_label_cv_accuracy"]) == {"Cilia", "Flagella"}


def test_a_multiple_choice_tag_with_nothing_to_tell_apart_goes_to_the_clusters():
    x, blob = blobs()
    labels = {i: {"shape": ["Round"]} for i in range(0, len(x), 4)}
    model = fit_project_model("v", x, list(range(len(x))), labels, CONFIG, clusters=4)
    assert "shape" not in model.learners and model.primary["shape"] == "clusters"
    assert all(p["shape"][0] == ["Round"] for p in model.predict(x, None, ()))


def test_a_single_choice_tag_needs_two_labels():
    x, blob = blobs(n_per=10)
    one = fit_project_model("v", x, list(range(len(x))), {0: {"life_form": ["Colony"]}}, CONFIG, clusters=4)
    assert "life_form" not in one.learners
    two = fit_project_model(
        "v", x, list(range(len(x))), {0: {"life_form": ["Colony"]}, 15: {"life_form": ["Filament"]}}, CONFIG
    )
    assert "life_form" in two.learners
    # One example of each label: held out, neither can be told apart. The tasks of the two blobs nobody
    # annotated resemble neither example: they score lower than those of the annotated ones.
    assert two.stats["evidence"]["life_form"]["cv_accuracy"] == 0.0
    scores = np.array([p["life_form"][1] for p in two.predict(x, None, ())])
    assert scores[blob >= 2].max() < scores[blob <= 1].mean(), (scores[blob >= 2], scores[blob <= 1])


def test_learner_round_trips_through_its_arrays():
    x, blob = blobs(seed=4)
    names = np.array(["Unicellular", "Colony", "Filament", "Colony"])[blob]
    labels = {i: {"life_form": [str(names[i])]} for i in range(0, len(x), 6)}
    model = fit_project_model("v", x, list(range(len(x))), labels, CONFIG)
    arrays: dict[str, np.ndarray] = {}
    meta = model.learners["life_form"].to_meta(arrays, "t/")
    again = TagLearner.from_meta(meta, arrays, "t/")
    assert again.stats == model.learners["life_form"].stats
    assert [p.classes for p in again.problems] == [["Colony", "Filament", "Unicellular"]]
    assert np.array_equal(again.problems[0].ridge.weight, model.learners["life_form"].problems[0].ridge.weight)


def test_agreement():
    assert agreement(["A", None, "B"], ["A", "A", "C"], multiple=False) == 1 / 3
    assert agreement([["A", "B"], None], [["A"], ["B"]], multiple=True) == 0.25
    assert agreement([], [], multiple=True) == 0.0
