"""What a project has learned: k-means clusters of its embeddings, labelled by its annotations.

Each cluster takes, for every `Choices` tag, the majority choice of its annotated members (for a
multiple-choice tag: every label more than half of them carry), scored by how pure the cluster is.
A cluster with no annotated member for a tag predicts nothing for that tag: no evidence, no choice.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans

from common.label_config import LabelConfig

Choice = tuple[list[str], float]  # labels chosen for one tag, and their score


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
    stats: dict[str, object] = field(default_factory=dict)

    def assign(self, embeddings: np.ndarray) -> np.ndarray:
        return np.argmax(embeddings @ self.centroids.T, axis=1)

    def predict(
        self, features: np.ndarray, probabilities: np.ndarray | None, class_names: tuple[str, ...]
    ) -> list[dict[str, Choice]]:
        clusters = self.assign(normalise(features)) if len(self.centroids) else np.full(len(features), -1)
        out = []
        for i, cluster in enumerate(clusters):
            choices: dict[str, Choice] = {}
            for tag, per_cluster in self.cluster_choices.items():
                if cluster >= 0 and per_cluster[cluster] is not None:
                    choices[tag] = per_cluster[cluster]
            if probabilities is not None:
                for tag, mapping in self.head_map.items():
                    if tag not in choices:
                        choices[tag] = head_choice(probabilities[i], class_names, mapping)
            out.append(choices)
        return out

    # -- persistence: one folder per version, written elsewhere and renamed into place -------------

    def save(self, project_dir: Path) -> Path:
        project_dir.mkdir(parents=True, exist_ok=True)
        final = project_dir / self.version
        tmp = project_dir / f".tmp-{self.version}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            np.save(tmp / "centroids.npy", self.centroids)
            meta = {
                "version": self.version,
                "cluster_choices": self.cluster_choices,
                "config_fingerprint": self.config_fingerprint,
                "head_map": self.head_map,
                "stats": self.stats,
            }
            (tmp / "model.json").write_text(json.dumps(meta))
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    @classmethod
    def load(cls, folder: Path) -> ProjectModel:
        meta = json.loads((folder / "model.json").read_text())
        choices = {
            tag: [None if c is None else (list(c[0]), float(c[1])) for c in per_cluster]
            for tag, per_cluster in meta["cluster_choices"].items()
        }
        return cls(
            version=meta["version"],
            centroids=np.load(folder / "centroids.npy"),
            cluster_choices=choices,
            config_fingerprint=meta["config_fingerprint"],
            head_map=meta.get("head_map", {}),
            stats=meta.get("stats", {}),
        )


def head_choice(probs: np.ndarray, class_names: tuple[str, ...], mapping: Mapping[str, str]) -> Choice:
    """Sum the backbone's class probabilities per mapped label; the most probable label wins."""
    totals: Counter[str] = Counter()
    for name, p in zip(class_names, probs, strict=True):
        if name in mapping:
            totals[mapping[name]] += float(p)
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
    kmeans = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(normalise(features))
    centroids = kmeans.cluster_centers_
    centroids = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    assignment = kmeans.labels_
    cluster_choices: dict[str, list[Choice | None]] = {}
    for tag in config.choices:
        members: list[list[list[str]]] = [[] for _ in range(k)]
        for tid, cluster in zip(task_ids, assignment, strict=True):
            chosen = labels.get(tid, {}).get(tag.name)
            if chosen:
                members[cluster].append([c for c in chosen if c in tag.labels])
        per_cluster = [cluster_choices_for_tag(m, tag.multiple) for m in members]
        if any(c is not None for c in per_cluster):
            cluster_choices[tag.name] = per_cluster
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
        stats={"tasks": len(task_ids), "annotated": sum(1 for t in task_ids if t in labels), "clusters": k},
    )
