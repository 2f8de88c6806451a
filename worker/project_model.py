"""What a project has learned: k-means clusters of its embeddings, labelled by its annotations, and
a light classifier per tag (worker/tag_models.py).

Each cluster takes, for every `Choices` tag, the majority choice of its annotated members (for a
multiple-choice tag: every label more than half of them carry), scored by how pure the cluster is.
A cluster with no annotated member for a tag predicts nothing for that tag: no evidence, no choice.
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from sklearn.cluster import KMeans

from common.label_config import LabelConfig
from worker.tag_models import LinearTagModel, agreement, fit_multiple, fit_single

Choice = tuple[list[str], float]  # labels chosen for one tag, and their score
META = "__meta__"


def normalise(features: np.ndarray) -> np.ndarray:
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def auto_clusters(n_tasks: int) -> int:
    return int(min(n_tasks, max(2, min(64, round(math.sqrt(n_tasks / 2))))))


@dataclass
class ProjectModel:
    version: str
    centroids: np.ndarray  # (k, dim), unit length
    cluster_choices: dict[str, list[Choice | None]]  # tag -> per cluster
    config_fingerprint: str
    head_map: dict[str, dict[str, str]] = field(default_factory=dict)  # tag -> backbone class -> label
    classifiers: dict[str, LinearTagModel] = field(default_factory=dict)
    primary: dict[str, str] = field(default_factory=dict)  # tag -> "classifier" | "clusters"
    stats: dict[str, object] = field(default_factory=dict)

    def assign(self, embeddings: np.ndarray) -> np.ndarray:
        return np.argmax(embeddings @ self.centroids.T, axis=1)

    def predict(
        self,
        features: np.ndarray,
        probabilities: np.ndarray | None,
        class_names: tuple[str, ...],
        collections: list[str] | None = None,
    ) -> list[dict[str, Choice]]:
        """`collections` is unused here: one model serves the whole project (see CollectionModels)."""
        x = normalise(features)
        clusters = self.assign(x) if len(self.centroids) else np.full(len(features), -1)
        by_classifier = {tag: clf.predict(x) for tag, clf in self.classifiers.items()}
        out = []
        for i, cluster in enumerate(clusters):
            choices: dict[str, Choice] = {}
            for tag in set(self.cluster_choices) | set(by_classifier):
                per_cluster = self.cluster_choices.get(tag)
                from_clusters = per_cluster[cluster] if per_cluster is not None and cluster >= 0 else None
                from_classifier = by_classifier[tag][i] if tag in by_classifier else None
                if self.primary.get(tag) == "classifier":
                    answer = from_classifier or from_clusters
                else:
                    answer = from_clusters or from_classifier
                if answer is not None:
                    choices[tag] = answer
            if probabilities is not None:
                for tag, mapping in self.head_map.items():
                    if tag not in choices:
                        choices[tag] = head_choice(probabilities[i], class_names, mapping)
            out.append(choices)
        return out

    # -- persistence: one blob per version, kept where every worker reads it (Redis) ------------------

    def to_meta(self, arrays: dict[str, np.ndarray], prefix: str = "") -> dict[str, object]:
        arrays[prefix + "centroids"] = self.centroids
        return {
            "kind": "project",
            "version": self.version,
            "cluster_choices": self.cluster_choices,
            "config_fingerprint": self.config_fingerprint,
            "head_map": self.head_map,
            "classifiers": {tag: clf.to_json() for tag, clf in self.classifiers.items()},
            "primary": self.primary,
            "stats": self.stats,
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, object], arrays: Mapping[str, np.ndarray], prefix: str = "") -> ProjectModel:
        choices = {
            tag: [None if c is None else (list(c[0]), float(c[1])) for c in per_cluster]
            for tag, per_cluster in meta["cluster_choices"].items()
        }
        return cls(
            version=meta["version"],
            centroids=arrays[prefix + "centroids"],
            cluster_choices=choices,
            config_fingerprint=meta["config_fingerprint"],
            head_map=meta.get("head_map", {}),
            classifiers={tag: LinearTagModel.from_json(d) for tag, d in meta.get("classifiers", {}).items()},
            primary=meta.get("primary", {}),
            stats=meta.get("stats", {}),
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
    """`members`: the labels each annotated member of one cluster has for the tag."""
    if not members:
        return None
    n = len(members)
    counts = Counter(label for labels in members for label in set(labels))
    if multiple:
        chosen = sorted(label for label, c in counts.items() if c / n > 0.5)
        if not chosen:
            return None
        return chosen, round(float(np.mean([counts[c] / n for c in chosen])), 4)
    label, count = counts.most_common(1)[0]
    return [label], round(count / n, 4)


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
    k = clusters or auto_clusters(len(task_ids))
    k = max(1, min(k, len(task_ids)))
    x = normalise(features)
    kmeans = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(x)
    centroids = normalise(kmeans.cluster_centers_)
    assignment = kmeans.labels_
    position = {tid: i for i, tid in enumerate(task_ids)}
    cluster_choices: dict[str, list[Choice | None]] = {}
    classifiers: dict[str, LinearTagModel] = {}
    primary: dict[str, str] = {}
    evidence: dict[str, dict[str, float]] = {}
    for tag in config.choices:
        annotated = [
            (tid, [c for c in labels[tid][tag.name] if c in tag.labels])
            for tid in task_ids
            if tid in labels and labels[tid].get(tag.name)
        ]
        annotated = [(tid, chosen) for tid, chosen in annotated if chosen]
        if not annotated:
            continue
        members: list[list[list[str]]] = [[] for _ in range(k)]
        for tid, chosen in annotated:
            members[assignment[position[tid]]].append(chosen)
        cluster_choices[tag.name] = [cluster_choices_for_tag(m, tag.multiple) for m in members]
        xs = x[[position[tid] for tid, _ in annotated]]
        truth = [chosen if tag.multiple else chosen[0] for _, chosen in annotated]
        clusters_cv = agreement(
            _cluster_oof(assignment[[position[tid] for tid, _ in annotated]], [c for _, c in annotated], tag.multiple,
                         seed),
            truth,
            tag.multiple,
        )  # fmt: skip
        fitted = (
            fit_multiple(tag.name, xs, truth, tag.labels, seed)
            if tag.multiple
            else fit_single(tag.name, xs, truth, seed)
        )
        scores = {"clusters": round(clusters_cv, 4), "annotated": len(annotated)}
        primary[tag.name] = "clusters"
        if fitted is not None:
            classifiers[tag.name], oof = fitted
            scores["classifier"] = round(agreement(list(oof), truth, tag.multiple), 4)
            if clusters_cv - scores["classifier"] < max(0.03, 2 / len(annotated)):
                primary[tag.name] = "classifier"
        evidence[tag.name] = scores
    valid_head = {
        tag: dict(mapping)
        for tag, mapping in (head_map or {}).items()
        if config.tag(tag) is not None and all(v in config.tag(tag).labels for v in mapping.values())
    }
    return ProjectModel(
        version=version,
        centroids=centroids.astype(np.float32),
        cluster_choices=cluster_choices,
        config_fingerprint=config.fingerprint,
        head_map=valid_head,
        classifiers=classifiers,
        primary=primary,
        stats={
            "tasks": len(task_ids),
            "annotated": sum(1 for t in task_ids if t in labels),
            "clusters": k,
            "evidence": evidence,
        },
    )


def _cluster_oof(clusters: np.ndarray, chosen: list[list[str]], multiple: bool, seed: int) -> list:
    """Cross-validated cluster-majority answers for the annotated tasks (None: cluster had no evidence)."""
    n = len(chosen)
    out: list = [None] * n
    order = np.random.default_rng(seed).permutation(n)
    for fold in np.array_split(order, min(5, n)):
        held = set(fold.tolist())
        for i in fold:
            members = [chosen[j] for j in range(n) if j not in held and clusters[j] == clusters[i]]
            answer = cluster_choices_for_tag(members, multiple)
            out[i] = None if answer is None else (answer[0] if multiple else answer[0][0])
    return out


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
