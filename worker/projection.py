"""The status page's embedding map: every task's features projected to 2D, coloured by its suggested labels.

Computed by a worker after each published version (`plankton.refresh_map`, worker/tasks/maps.py) and stored
under one Redis key (`keys.projection`) as gzip-compressed JSON, which the API hands to the browser as it is:
a request never computes anything, whatever the size of the project.

- **Projection.** PCA to two components, fitted on at most FIT_ROWS sampled tasks (annotated ones first) and
  applied to all of them block by block: 50,000 tasks of 1,280 features take a few seconds. Coordinates are
  scaled to a square grid (0..GRID, one scale for both axes, so distances keep their proportions) with the
  outermost 0.5% clipped to the edge, so one outlier cannot squeeze the rest into a corner.
- **Colours.** Per `Choices` tag, each point's label: the annotation's for an annotated task (marked as such),
  else the first choice of the current version's prediction (or the previous version's while the current
  one is still being filled), else none.
- **Thumbnails.** The API never fetches images (task URLs are untrusted). The worker, whose downloads pass the
  outbound guard, stores small WebP thumbnails (THUMB_SIDE px) of a bounded sample of the points (annotated
  tasks first, then a sample that stays the same as the project grows) inside the map. A refresh reuses the
  previous map's thumbnails and fetches at most THUMB_NEW_PER_REFRESH new ones, for at most THUMB_SECONDS: a
  few seconds of the worker's time, and of Label Studio's when it serves the images.
- **Bounded.** At most MAX_POINTS points (beyond, annotated tasks and a stable sample) and MAX_THUMBS
  thumbnails within THUMB_BYTES: about 0.5 MB of points (gzip) and 1.5 MB of thumbnails per project at most.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import gzip
import io
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, features

from common.store import Store, truth
from worker.images import ImageError, decode_image, image_reference
from worker.pipeline import FEATURE_DTYPE
from worker.runtime import Runtime

log = logging.getLogger(__name__)

FORMAT = 1
MAX_POINTS = 50_000
FIT_ROWS = 10_000
MAX_THUMBS = 2_000
THUMB_BYTES = 1_500_000  # at most this much of thumbnails per map (a FlowCam particle's is about 200 bytes)
THUMB_SIDE = 48
THUMB_NEW_PER_REFRESH = 500  # new thumbnails fetched per refresh (the rest come with the next ones)
THUMB_SECONDS = 30.0
GRID = 4095
CLIP_PERCENT = 0.5
READ_BATCH = 4096
THUMB_TYPE = "webp" if features.check("webp") else "png"


def stable_order(task_ids: Iterable[int]) -> list[int]:
    """Task ids in a pseudo-random order that does not depend on which other tasks exist: a sample taken
    as a prefix of it changes little when the project grows (Knuth's multiplicative hash)."""
    return sorted(task_ids, key=lambda t: ((t * 2654435761) & 0xFFFFFFFF, t))


def sample(task_ids: Iterable[int], preferred: set[int], limit: int) -> list[int]:
    """At most `limit` of the tasks: the preferred ones first (up to all of `limit`), then a stable sample."""
    ids = list(task_ids)
    if len(ids) <= limit:
        return sorted(ids)
    first = stable_order(t for t in ids if t in preferred)[:limit]
    rest = stable_order(t for t in ids if t not in preferred)[: limit - len(first)]
    return sorted(first + rest)


def read_features(store: Store, pid: int, task_ids: Sequence[int]) -> tuple[list[int], np.ndarray]:
    """The stored float16 features of these tasks (those deleted meanwhile are left out), read in batches."""
    kept: list[int] = []
    rows: list[np.ndarray] = []
    for start in range(0, len(task_ids), READ_BATCH):
        blobs = store.embeddings(pid, task_ids[start : start + READ_BATCH])
        for tid, blob in blobs.items():
            kept.append(tid)
            rows.append(np.frombuffer(blob, FEATURE_DTYPE))
    dims = {len(r) for r in rows}
    if len(dims) > 1:  # a space change half-way: keep the most common width
        width = max(dims, key=lambda d: sum(len(r) == d for r in rows))
        pairs = [(t, r) for t, r in zip(kept, rows, strict=True) if len(r) == width]
        kept, rows = [t for t, _ in pairs], [r for _, r in pairs]
    matrix = np.stack(rows) if rows else np.zeros((0, 0), FEATURE_DTYPE)
    return kept, matrix


def project(matrix: np.ndarray, fit_rows: Sequence[int] | None = None, seed: int = 0) -> tuple[np.ndarray, list]:
    """2D PCA coordinates of every row (fitted on `fit_rows`, else on at most FIT_ROWS random rows), and the
    share of the variance each axis explains."""
    n = len(matrix)
    if n < 3 or matrix.shape[1] < 2:
        return np.zeros((n, 2), np.float32), [0.0, 0.0]
    from sklearn.decomposition import PCA

    if fit_rows is None:
        fit_rows = np.sort(np.random.default_rng(seed).choice(n, FIT_ROWS, replace=False)) if n > FIT_ROWS else None
    fit = matrix[fit_rows] if fit_rows is not None else matrix
    pca = PCA(n_components=2, svd_solver="randomized" if len(fit) > 2000 else "full", random_state=seed)
    pca.fit(np.asarray(fit, np.float32))
    out = np.empty((n, 2), np.float32)
    for start in range(0, n, READ_BATCH):
        out[start : start + READ_BATCH] = pca.transform(np.asarray(matrix[start : start + READ_BATCH], np.float32))
    return out, [round(float(v), 4) for v in pca.explained_variance_ratio_]


def to_grid(xy: np.ndarray) -> np.ndarray:
    """Integer coordinates 0..GRID, one scale for both axes, each axis centred, the outermost CLIP_PERCENT
    on each side clipped to the edge."""
    if len(xy) == 0:
        return np.zeros((0, 2), np.int32)
    lo = np.percentile(xy, CLIP_PERCENT, axis=0)
    hi = np.percentile(xy, 100 - CLIP_PERCENT, axis=0)
    span = float(np.max(hi - lo))
    if not np.isfinite(span) or span <= 0:
        return np.full((len(xy), 2), GRID // 2, np.int32)
    centre = (lo + hi) / 2
    scaled = (np.clip(xy, lo, hi) - centre) / span * GRID + GRID / 2
    return np.clip(np.rint(scaled), 0, GRID).astype(np.int32)


def first_choices(prediction: Mapping[str, Any] | None) -> dict[str, str]:
    """{tag: first choice} of a Label Studio prediction (its `result` items of type choices)."""
    out: dict[str, str] = {}
    for item in (prediction or {}).get("result") or []:
        if not isinstance(item, Mapping):
            continue
        choices = (item.get("value") or {}).get("choices") if isinstance(item.get("value"), Mapping) else None
        tag = item.get("from_name")
        if isinstance(tag, str) and isinstance(choices, list) and choices and isinstance(choices[0], str):
            out.setdefault(tag, choices[0])
    return out


def suggestions(store: Store, pid: int, version: str, task_ids: Sequence[int]) -> dict[int, dict[str, str]]:
    """Each task's {tag: first suggested choice}: the version's prediction, else (while that version is
    still being filled in) the newest earlier version's that is still stored."""
    older = [v["version"] for v in store.versions(pid) if v.get("version") != version][-2:][::-1]
    found: dict[int, dict[str, str]] = {}
    for name in [version, *older]:
        missing = [t for t in task_ids if t not in found]
        for start in range(0, len(missing), READ_BATCH):
            for tid, pred in store.predictions(pid, name, missing[start : start + READ_BATCH]).items():
                found[tid] = first_choices(pred)
    return found


def thumbnail(data: bytes, max_pixels: int, max_side: int, max_aspect: float) -> str:
    """A data URI of the image shrunk to fit THUMB_SIDE (never enlarged), as WebP (PNG without WebP)."""
    img = decode_image(data, max_pixels, max_side=max_side, max_aspect=max_aspect)
    img.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if THUMB_TYPE == "webp":
        img.save(buf, format="WEBP", quality=75, method=4)
    else:
        img.save(buf, format="PNG", optimize=True)
    return f"data:image/{THUMB_TYPE};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def make_thumbnails(rt: Runtime, pid: int, task_ids: Sequence[int], deadline: float) -> dict[int, str]:
    """Thumbnails of these tasks, fetched through the worker's guarded fetcher; a task whose image fails (or
    that the deadline leaves out) has none."""
    if not task_ids:
        return {}
    refs = rt.store.task_images(pid, task_ids)
    lacking = [t for t in task_ids if t not in refs]
    if lacking:
        try:
            key = rt.label_config(pid).image_key
        except (LookupError, ValueError):
            key = ""
        for task in rt.store.tasks(pid, lacking) if key else []:
            with contextlib.suppress(ImageError):
                refs[task["id"]] = image_reference(task, key)
    s = rt.settings

    def one(tid: int) -> tuple[int, str]:
        if time.monotonic() > deadline:
            raise TimeoutError("thumbnail deadline passed")
        return tid, thumbnail(rt.fetcher.fetch(refs[tid]), s.image_max_pixels, s.image_max_side, s.image_max_aspect)

    out: dict[int, str] = {}
    failed = 0
    pool = concurrent.futures.ThreadPoolExecutor(max(1, min(s.download_workers, 16)), thread_name_prefix="thumb")
    try:
        futures = [pool.submit(one, t) for t in task_ids if t in refs]
        try:
            for future in concurrent.futures.as_completed(futures, timeout=max(0.0, deadline - time.monotonic())):
                try:
                    tid, uri = future.result()
                    out[tid] = uri
                except Exception:  # a broken or vanished image has no thumbnail; its task's reason is elsewhere
                    failed += 1
        except concurrent.futures.TimeoutError:
            log.info("project %s: thumbnails stopped at the %g s deadline; the next refresh goes on", pid,
                     THUMB_SECONDS)  # fmt: skip
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if failed:
        log.info("project %s: %d of %d thumbnails failed", pid, failed, len(task_ids))
    return out


def within_budget(thumbs: Mapping[int, str], order: Sequence[int], budget: int) -> dict[int, str]:
    """The thumbnails, taken in `order` (annotated tasks first), until they would exceed `budget` bytes."""
    kept: dict[int, str] = {}
    used = 0
    for tid in order:
        uri = thumbs.get(tid)
        if uri is None:
            continue
        if used + len(uri) > budget:
            break
        kept[tid] = uri
        used += len(uri)
    return kept


def previous_thumbnails(store: Store, pid: int) -> dict[int, str]:
    blob = store.projection(pid)
    if not blob:
        return {}
    try:
        thumbs = json.loads(gzip.decompress(blob)).get("thumbs") or {}
        return {int(t): uri for t, uri in thumbs.items() if isinstance(uri, str)}
    except (OSError, ValueError, AttributeError):
        return {}


def compute_projection(rt: Runtime, pid: int) -> dict[str, Any] | None:
    """The map of the project as it is now (see the module's docstring); None when no task has features."""
    store = rt.store
    version = store.current_version(pid)
    featured = store.featured_tasks(pid)
    if not featured:
        return None
    annotations = store.annotations(pid)
    annotated = set(annotations) & featured
    task_ids, matrix = read_features(store, pid, sample(featured, annotated, MAX_POINTS))
    if not task_ids:
        return None
    fit_rows = None
    if len(task_ids) > FIT_ROWS:  # annotated tasks always shape the axes, then a stable sample of the rest
        preferred = set(sample(task_ids, annotated, FIT_ROWS))
        fit_rows = [i for i, t in enumerate(task_ids) if t in preferred]
    xy, explained = project(matrix, fit_rows)
    grid = to_grid(xy)
    del matrix

    try:
        tag_defs = [(tag.name, list(tag.labels)) for tag in rt.label_config(pid).choices]
    except (LookupError, ValueError):
        tag_defs = []
    suggested = suggestions(store, pid, version, [t for t in task_ids if t not in annotated])
    truths = {t: truth(annotations[t]) for t in annotated}
    known = {name for name, _ in tag_defs}
    for chosen in [*suggested.values(), *truths.values()]:
        for tag in chosen:
            if tag not in known:
                known.add(tag)
                tag_defs.append((tag, []))
    tags = []
    for name, labels in tag_defs:
        index = {label: i for i, label in enumerate(labels)}
        codes = []
        for tid in task_ids:
            # An annotated task shows its annotation; the others the model's suggestion.
            chosen = (truths[tid].get(name) or [None])[0] if tid in annotated else suggested.get(tid, {}).get(name)
            if chosen is None:
                codes.append(-1)
                continue
            if chosen not in index:
                index[chosen] = len(labels)
                labels.append(chosen)
            codes.append(index[chosen])
        tags.append({"name": name, "labels": labels, "codes": codes})

    wanted = sample(task_ids, annotated, MAX_THUMBS)
    first = stable_order(t for t in wanted if t in annotated) + stable_order(t for t in wanted if t not in annotated)
    old = previous_thumbnails(store, pid)
    thumbs = {t: old[t] for t in wanted if t in old}
    todo = [t for t in first if t not in thumbs][:THUMB_NEW_PER_REFRESH]
    thumbs.update(make_thumbnails(rt, pid, todo, time.monotonic() + THUMB_SECONDS))
    thumbs = within_budget(thumbs, first, THUMB_BYTES)
    return {
        "format": FORMAT,
        "project": pid,
        "version": version,
        "computed": round(time.time(), 3),
        "method": "pca",
        "explained": explained,
        "total": len(featured),
        "grid": GRID,
        "tasks": task_ids,
        "x": grid[:, 0].tolist(),
        "y": grid[:, 1].tolist(),
        "annotated": [1 if t in annotated else 0 for t in task_ids],
        "tags": tags,
        "thumb_side": THUMB_SIDE,
        "thumbs": {str(t): thumbs[t] for t in sorted(thumbs)},
    }


def encode(projection: Mapping[str, Any]) -> bytes:
    return gzip.compress(json.dumps(projection, separators=(",", ":")).encode(), compresslevel=6, mtime=0)


def refresh_projection(rt: Runtime, pid: int, rounds: int = 1) -> dict[str, Any]:
    """Compute and store the map; again (up to `rounds` times) when a new version was published meanwhile.
    After a refit, one round: the refit that published the newer version has scheduled the next map
    (`Dispatcher.refresh_map_soon`). Returns what was stored."""
    outcome: dict[str, Any] = {"status": "no embeddings", "project": pid}
    for _ in range(rounds):
        started, version = time.monotonic(), rt.store.current_version(pid)
        projection = compute_projection(rt, pid)
        if projection is None:
            return outcome
        blob = encode(projection)
        rt.store.set_projection(pid, blob)
        outcome = {"status": "stored", "project": pid, "version": projection["version"],
                   "points": len(projection["tasks"]), "thumbs": len(projection["thumbs"]), "bytes": len(blob),
                   "seconds": round(time.monotonic() - started, 2)}  # fmt: skip
        log.info("project %s: map of %s stored: %d points, %d thumbnails, %d bytes in %.1f s", pid, version,
                 outcome["points"], outcome["thumbs"], len(blob), outcome["seconds"])  # fmt: skip
        if rt.store.current_version(pid) == version:
            break
    return outcome
