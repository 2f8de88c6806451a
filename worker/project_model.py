"""What a project has learned, and how it answers: one learner per `Choices` tag (worker/tag_models.py),
fitted on the annotated tasks and on the embeddings of all the others, in an embedding space of the
project's own (worker/learning.py).

Every task also gets the k-means cluster of the project's tasks it falls in (`TaskChoices.cluster`, sent as
the prediction's `cluster`: Label Studio's uncertainty sampling balances the clusters an annotator has
labelled, then takes the lowest score). A cluster is named by the smallest task id among its members when
it was fitted, so that a cluster that outlives a refit keeps its number.

A tag whose annotations hold no two labels to tell apart has no learner yet: the clusters answer for it
instead, each cluster with the majority choice of its annotated members
(for a multiple-choice tag: every label more than half of them carry), scored by the cluster's purity
with one success and one failure added (so one annotated member claims 2/3, not certainty). A cluster
with no annotated member answers nothing for that tag: no evidence, no choice. The backbone's own head
(`head_map`) answers a tag only where nothing else does.
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from sklearn.cluster import KMeans

from common.label_config import LabelConfig
from worker.learning import CHUNK, GRAPH_KS, FeatureSpace, fit_space, graphs, l2, neighbours
from worker.tag_models import Neighbours, TagLearner, agreement, fit_tag

Choice = tuple[list[str], float]  # labels chosen for one tag, and their score
META = "__meta__"


class TaskChoices(dict[str, Choice]):
    """One task's answer, tag -> choice, and the cluster it falls in (None: no clusters)."""

    def __init__(self, *args: object, cluster: int | None = None) -> None:
        super().__init__(*args)
        self.cluster = cluster


def normalise(features: np.ndarray) -> np.ndarray:
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def auto_clusters(n_tasks: int) -> int:
    return int(min(n_tasks, max(2, min(64, round(math.sqrt(n_tasks / 2))))))


@dataclass
class ProjectModel:
    version: str
    centroids: np.ndarray  # (k, r) unit length, in the space's PCA coordinates
    cluster_choices: dict[str, list[Choice | None]]  # tag -> per cluster (tags without a learner)
    config_fingerprint: str
    head_map: dict[str, dict[str, str]] = field(default_factory=dict)  # tag -> backbone class -> label
    learners: dict[str, TagLearner] = field(default_factory=dict)
    primary: dict[str, str] = field(default_factory=dict)  # tag -> "learner" | "clusters"
    stats: dict[str, object] = field(default_factory=dict)
    space: FeatureSpace | None = None
    cluster_ids: np.ndarray | None = None  # (k,) each cluster's name: its smallest member's task id

    def assign(self, features: np.ndarray) -> np.ndarray:
        """The cluster of each task (raw backbone features)."""
        if self.space is None or not len(self.centroids):
            return np.full(len(features), -1)
        return np.argmax(self.space.low(self.space.full(features)) @ self.centroids.T, axis=1)

    def predict(
        self,
        features: np.ndarray,
        probabilities: np.ndarray | None,
        class_names: tuple[str, ...],
        collections: list[str] | None = None,
    ) -> list[TaskChoices]:
        """`collections` is unused here: one model serves the whole project (see CollectionModels).
        Inductive: only the stored parameters are used, so tasks the fit never saw are answered alike."""
        out: list[TaskChoices] = []
        for start in range(0, len(features), CHUNK):
            out += self._predict_block(np.asarray(features[start : start + CHUNK], np.float32))
        if probabilities is not None:
            for i, choices in enumerate(out):
                for tag, mapping in self.head_map.items():
                    if tag not in choices:
                        choices[tag] = head_choice(probabilities[i], class_names, mapping)
        return out

    def _predict_block(self, features: np.ndarray) -> list[TaskChoices]:
        if self.space is None or not len(features):
            return [TaskChoices() for _ in range(len(features))]
        full = self.space.full(features)
        low = self.space.low(full)
        clusters = np.argmax(low @ self.centroids.T, axis=1) if len(self.centroids) else None
        names = self.cluster_ids if self.cluster_ids is not None else np.arange(len(self.centroids))
        if clusters is None:
            out = [TaskChoices() for _ in range(len(features))]
        else:
            out = [TaskChoices(cluster=int(names[c])) for c in clusters]
        if self.learners:
            idx, sim = neighbours(low, self.space.anchors, max(GRAPH_KS))
            x = Neighbours(full, low, idx, sim)
            for tag, learner in self.learners.items():
                for i, answer in enumerate(learner.predict(x)):
                    if answer is not None:
                        out[i][tag] = answer
        if self.cluster_choices and clusters is not None:
            for tag, per_cluster in self.cluster_choices.items():
                for i, c in enumerate(clusters):
                    if tag not in out[i] and per_cluster[c] is not None:
                        out[i][tag] = per_cluster[c]
        return out

    # -- persistence: one blob per version, kept where every worker reads it (Redis) ------------------

    def to_meta(self, arrays: dict[str, np.ndarray], prefix: str = "") -> dict[str, object]:
        arrays[prefix + "centroids"] = self.centroids.astype(np.float32)
        if self.cluster_ids is not None:
            arrays[prefix + "cluster_ids"] = self.cluster_ids.astype(np.int64)
        if self.space is not None:
            arrays[prefix + "space/mean"] = self.space.mean.astype(np.float32)
            arrays[prefix + "space/basis"] = self.space.basis.astype(np.float16)
            arrays[prefix + "space/anchors"] = self.space.anchors.astype(np.float16)
        tags = sorted(self.learners)
        return {
            "kind": "project",
            "version": self.version,
            "cluster_choices": self.cluster_choices,
            "config_fingerprint": self.config_fingerprint,
            "head_map": self.head_map,
            "space": self.space is not None,
            "learners": {tag: self.learners[tag].to_meta(arrays, f"{prefix}tag{i}/") for i, tag in enumerate(tags)},
            "learner_order": tags,
            "primary": self.primary,
            "stats": self.stats,
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, object], arrays: Mapping[str, np.ndarray], prefix: str = "") -> ProjectModel:
        choices = {
            tag: [None if c is None else (list(c[0]), float(c[1])) for c in per_cluster]
            for tag, per_cluster in meta["cluster_choices"].items()
        }
        space = None
        if meta.get("space"):
            space = FeatureSpace(
                arrays[prefix + "space/mean"], arrays[prefix + "space/basis"], arrays[prefix + "space/anchors"]
            )
        order = meta.get("learner_order", [])
        learners = {
            tag: TagLearner.from_meta(meta["learners"][tag], arrays, f"{prefix}tag{i}/") for i, tag in enumerate(order)
        }
        return cls(
            version=meta["version"],
            centroids=arrays[prefix + "centroids"],
            cluster_choices=choices,
            config_fingerprint=meta["config_fingerprint"],
            head_map=meta.get("head_map", {}),
            learners=learners,
            primary=meta.get("primary", {}),
            stats=meta.get("stats", {}),
            space=space,
            cluster_ids=arrays.get(prefix + "cluster_ids"),
        )


def head_choice(probs: np.ndarray, class_names: tuple[str, ...], mapping: Mapping[str, str]) -> Choice:
    """Sum the backbone's class probabilities per mapped label; the most probable label wins."""
    totals: Counter[str] = Counter()
    for name, p in zip(class_names, probs, strict=True):
        if name in mapping:
            totals[mapping[name]] += float(p)
    if not totals:
        return [], 0.0
    label, score = totals.most_common(1)[0]
    return [label], round(score, 4)


def cluster_choices_for_tag(members: list[list[str]], multiple: bool) -> Choice | None:
    """`members`: the labels each annotated member of one cluster has for the tag. The score is the share
    of members agreeing with one success and one failure added (Laplace): a lone member claims 2/3."""
    if not members:
        return None
    n = len(members)
    counts = Counter(label for labels in members for label in set(labels))
    if multiple:
        chosen = sorted(label for label, c in counts.items() if c / n > 0.5)
        if not chosen:
            return None
        return chosen, round(float(np.mean([(counts[c] + 1) / (n + 2) for c in chosen])), 4)
    label, count = counts.most_common(1)[0]
    return [label], round((count + 1) / (n + 2), 4)


def fit_project_model(
    version: str,
    features: np.ndarray,
    task_ids: list[int],
    labels: Mapping[int, Mapping[str, list[str]]],
    config: LabelConfig,
    clusters: int = 0,
    head_map: Mapping[str, Mapping[str, str]] | None = None,
    seed: int = 0,
) -> ProjectModel:
    """`features`: the raw backbone features of every task of the project (annotated or not), in the order
    of `task_ids`; `labels`: task id -> tag -> labels, for the annotated tasks."""
    n = len(task_ids)
    position = {tid: i for i, tid in enumerate(task_ids)}
    per_tag: dict[str, list[tuple[int, list[str]]]] = {}
    for tag in config.choices:
        annotated = []
        for tid in task_ids:
            chosen = [c for c in (labels.get(tid, {}).get(tag.name) or []) if c in tag.labels]
            if chosen:
                annotated.append((position[tid], chosen))
        if annotated:
            per_tag[tag.name] = annotated
    valid_head = {
        tag: dict(mapping)
        for tag, mapping in (head_map or {}).items()
        if config.tag(tag) is not None and all(v in config.tag(tag).labels for v in mapping.values())
    }
    stats: dict[str, object] = {"tasks": n, "annotated": sum(1 for t in task_ids if t in labels)}
    if n == 0:
        return ProjectModel(version, np.zeros((0, 1), np.float32), {}, config.fingerprint, valid_head, stats=stats)

    priority = np.zeros(n, bool)
    for annotated in per_tag.values():
        priority[[r for r, _ in annotated]] = True
    space, full, anchor_rows = fit_space(features, priority, seed)
    anchors = np.asarray(space.anchors, np.float32)
    anchor_of = np.full(n, -1)
    anchor_of[anchor_rows] = np.arange(len(anchor_rows))

    found: dict[int, sp.csr_matrix] = {}
    if any(len(a) >= 2 for a in per_tag.values()):
        found = graphs(anchors, GRAPH_KS)[0]
    # The clusters: every task's prediction names its own (Label Studio's uncertainty sampling), and a tag
    # with one label annotated is answered by them.
    k = max(1, min(clusters or auto_clusters(n), len(anchors)))
    kmeans = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(cluster_sample(anchors, k, seed))
    centroids = l2(kmeans.cluster_centers_).astype(np.float32)
    assignment = np.argmax(space.low(full) @ centroids.T, axis=1)
    cluster_ids = cluster_names(assignment, task_ids, k)
    learners: dict[str, TagLearner] = {}
    cluster_choices: dict[str, list[Choice | None]] = {}
    primary: dict[str, str] = {}
    evidence: dict[str, dict[str, object]] = {}
    coverage: dict[str, float] = {}
    for tag in config.choices:
        annotated = per_tag.get(tag.name)
        if not annotated:
            continue
        learner = fit_tag(tag.name, tag.multiple, tag.labels, annotated, full, anchor_of, found, seed, anchors)
        if learner is not None:
            learners[tag.name] = learner
            primary[tag.name] = "learner"
            evidence[tag.name] = {**learner.stats, "evidence": "learner"}
            continue
        members: list[list[list[str]]] = [[] for _ in range(k)]
        for row, chosen in annotated:
            members[assignment[row]].append(chosen)
        per_cluster = [cluster_choices_for_tag(m, tag.multiple) for m in members]
        cluster_choices[tag.name] = per_cluster
        primary[tag.name] = "clusters"
        answered = np.array([per_cluster[c] is not None for c in assignment])
        coverage[tag.name] = round(float(answered.mean()), 4)
        evidence[tag.name] = {
            "annotated": len(annotated),
            "labels": dict(Counter(label for _, chosen in annotated for label in chosen)),
            "cv_accuracy": round(_cluster_loo(assignment, annotated, tag.multiple), 4),
            "cv_tasks": len(annotated),
            "evidence": "clusters",
        }
    model = ProjectModel(
        version=version,
        centroids=centroids,
        cluster_choices=cluster_choices,
        config_fingerprint=config.fingerprint,
        head_map=valid_head,
        learners=learners,
        primary=primary,
        space=space,
        cluster_ids=cluster_ids,
    )
    if learners:  # coverage of each learner's tag, measured on the anchors (a random sample of the tasks)
        answers = model._predict_block(features[anchor_rows])
        for tag in learners:
            coverage[tag] = round(float(np.mean([tag in a for a in answers])), 4)
    for tag, value in coverage.items():
        evidence[tag]["coverage"] = value
    model.stats = {**stats, "clusters": k, "anchors": len(anchor_rows), "evidence": evidence}
    return model


KMEANS_SAMPLE = 1000  # anchors the clusters are fitted on, at most


def cluster_sample(anchors: np.ndarray, k: int, seed: int) -> np.ndarray:
    """At most KMEANS_SAMPLE of the anchors (at least 20 per cluster): every fit now makes the clusters, and
    on all 3,000 anchors with three starts they took half of a 5,000-task fit."""
    size = max(KMEANS_SAMPLE, 20 * k)
    if len(anchors) <= size:
        return anchors
    return anchors[np.sort(np.random.default_rng(seed).choice(len(anchors), size, replace=False))]


def cluster_names(assignment: np.ndarray, task_ids: list[int], k: int) -> np.ndarray:
    """Each cluster's name: the smallest task id among its members (a cluster no task fell in: -1 - its
    index). Label Studio counts the tasks an annotator solved per cluster number across versions, so a
    number should mean the same group of tasks after a refit: a cluster that keeps its oldest task keeps it."""
    names = -1 - np.arange(k, dtype=np.int64)
    ids = np.asarray(task_ids, np.int64)
    for c in range(k):
        members = ids[assignment == c]
        if len(members):
            names[c] = members.min()
    return names


def _cluster_loo(assignment: np.ndarray, annotated: list[tuple[int, list[str]]], multiple: bool) -> float:
    """Leave-one-out agreement of the cluster majorities on the annotated tasks (no answer: wrong). In a
    cluster with more than 200 annotated members one member's vote changes nothing: the whole cluster's
    answer stands in for its leave-one-out answers."""
    groups: dict[int, list[int]] = {}
    for i, (row, _) in enumerate(annotated):
        groups.setdefault(int(assignment[row]), []).append(i)
    predicted: list[object] = [None] * len(annotated)
    for members in groups.values():
        whole = cluster_choices_for_tag([annotated[j][1] for j in members], multiple)
        for i in members:
            if len(members) > 200:
                answer = whole
            else:
                answer = cluster_choices_for_tag([annotated[j][1] for j in members if j != i], multiple)
            predicted[i] = None if answer is None else (answer[0] if multiple else answer[0][0])
    truth = [chosen if multiple else chosen[0] for _, chosen in annotated]
    return agreement(predicted, truth, multiple)


@dataclass
class CollectionModels:
    """Per-bucket scope: one model per image collection (S3 bucket, ...) of the project, each fitted on
    that collection's tasks and annotations alone, as the original deployment kept one k-means per bucket.
    A task of a collection with no model gets no choice."""

    version: str
    models: dict[str, ProjectModel]
    config_fingerprint: str
    stats: dict[str, object] = field(default_factory=dict)

    @property
    def head_map(self) -> dict[str, dict[str, str]]:
        return next((m.head_map for m in self.models.values() if m.head_map), {})

    def predict(
        self,
        features: np.ndarray,
        probabilities: np.ndarray | None,
        class_names: tuple[str, ...],
        collections: list[str] | None = None,
    ) -> list[dict[str, Choice]]:
        out: list[dict[str, Choice]] = [{} for _ in range(len(features))]
        collections = collections or [""] * len(features)
        for name, model in self.models.items():
            rows = [i for i, c in enumerate(collections) if c == name]
            if rows:
                probs = probabilities[rows] if probabilities is not None else None
                for i, choices in zip(rows, model.predict(features[rows], probs, class_names), strict=True):
                    out[i] = choices
        return out

    def to_meta(self, arrays: dict[str, np.ndarray], prefix: str = "") -> dict[str, object]:
        names = sorted(self.models)
        return {
            "kind": "collections",
            "version": self.version,
            "config_fingerprint": self.config_fingerprint,
            "stats": self.stats,
            "collections": {name: self.models[name].to_meta(arrays, f"{prefix}{i}/") for i, name in enumerate(names)},
        }

    @classmethod
    def from_meta(
        cls, meta: Mapping[str, object], arrays: Mapping[str, np.ndarray], prefix: str = ""
    ) -> CollectionModels:
        models = {
            name: ProjectModel.from_meta(sub, arrays, f"{prefix}{i}/")
            for i, (name, sub) in enumerate(sorted(meta["collections"].items()))
        }
        return cls(meta["version"], models, meta["config_fingerprint"], meta.get("stats", {}))


Model = ProjectModel | CollectionModels


def model_to_bytes(model: Model) -> bytes:
    """One compressed blob (arrays, and the rest as JSON), small whatever the project's size."""
    arrays: dict[str, np.ndarray] = {}
    meta = model.to_meta(arrays)
    arrays[META] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def model_from_bytes(blob: bytes) -> Model:
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    meta = json.loads(arrays.pop(META).tobytes())
    return (CollectionModels if meta["kind"] == "collections" else ProjectModel).from_meta(meta, arrays)


def fit_model(
    features: np.ndarray,
    task_ids: list[int],
    labels: Mapping[int, Mapping[str, list[str]]],
    config: LabelConfig,
    collections: list[str],
    per_collection: bool = False,
    clusters: int = 0,
    head_map: Mapping[str, Mapping[str, str]] | None = None,
) -> Model:
    """The project's model, or with `per_collection` one model per image collection (MODEL_SCOPE=bucket),
    each fitted on that collection's tasks and annotations alone. The version is named at publication."""

    def fit(rows: list[int]) -> ProjectModel:
        ids = [task_ids[i] for i in rows]
        return fit_project_model("", features[rows], ids, labels, config, clusters=clusters, head_map=head_map)

    if not per_collection:
        return fit(list(range(len(task_ids))))
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(collections):
        groups.setdefault(name, []).append(i)
    models = {name: fit(rows) for name, rows in groups.items()}
    stats = {"tasks": len(task_ids), "annotated": sum(1 for t in task_ids if t in labels),
             "collections": {n: m.stats for n, m in models.items()}}  # fmt: skip
    return CollectionModels("", models, config.fingerprint, stats)
