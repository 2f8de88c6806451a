"""Inference in batches, and the download + embed pipeline with its content-addressed cache in Redis."""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.settings import Settings
from common.store import Store
from tests.helpers import DATA, ImageServer, png_bytes, synthetic_particle
from worker.backbones import create_backbone
from worker.embedder import Embedder, pick_device
from worker.images import ImageFetcher, decode_image, to_model_input
from worker.pipeline import EmbeddingPipeline, from_bytes, to_bytes

SIZE = 64
KINDS = ("round", "rod", "speckle")


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(create_backbone("efficientnet-lite0"), torch.device("cpu"), SIZE, batch_size=4)


@pytest.fixture
def pipeline(embedder: Embedder, clean_redis) -> Iterator[EmbeddingPipeline]:
    settings = dataclasses.replace(Settings(), download_timeout=5.0, image_hosts="127.0.0.1")
    pipe = EmbeddingPipeline(embedder, ImageFetcher(settings), Store(clean_redis, "test-space"), 4, 10_000_000)
    yield pipe
    pipe.close()


@pytest.fixture
def serve(image_server: ImageServer) -> Iterator:
    """Writes bytes under the image server's tmp folder and returns their URL."""
    folder = Path(image_server.root) / "tmp" / f"embedder-{uuid.uuid4().hex}"
    folder.mkdir()

    def put(name: str, data: bytes) -> str:
        (folder / name).write_bytes(data)
        return f"{image_server.url}/tmp/{folder.name}/{name}"

    return put


def model_inputs(n: int) -> list[np.ndarray]:
    return [to_model_input(Image.fromarray(synthetic_particle(KINDS[i % 3], i, size=40)), SIZE) for i in range(n)]


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_batches_equal_one_by_one(embedder: Embedder):
    images = model_inputs(10)
    batched = embedder.embed(images)  # batches of 4, 4 and 2
    assert batched.shape == (10, 1280) and batched.dtype == np.float32
    single = np.concatenate([embedder.embed([img]) for img in images])
    np.testing.assert_allclose(batched, single, atol=1e-4, rtol=0)
    # Different classes give different features (the test would pass trivially on constant output).
    assert np.abs(batched[0] - batched[1]).max() > 1e-2


def test_frozen_model_equals_eager_mode(embedder: Embedder):
    assert embedder.frozen is not None, "the CPU embedder runs the TorchScript-frozen model"
    eager = Embedder(embedder.backbone, torch.device("cpu"), SIZE, batch_size=4, torchscript=False)
    assert eager.frozen is None
    images = model_inputs(7)  # batches of 4 and 3: the frozen model was traced with a batch of 2
    frozen_out, eager_out = embedder.embed(images), eager.embed(images)
    # Batch norm folded into the convolutions changes rounding only.
    np.testing.assert_allclose(frozen_out, eager_out, atol=1e-3, rtol=1e-3)
    assert np.abs(frozen_out[0] - frozen_out[1]).max() > 1e-2


def test_resized_on_the_device_as_on_the_host(embedder: Embedder):
    """The GPU worker's path (particles at their own size, resized in batches by the model's device), run
    here on the CPU: the same features as resizing each image on the host, whatever mix of sizes a batch
    holds, and an image larger than the input is still shrunk on the host."""
    on_device = Embedder(embedder.backbone, torch.device("cpu"), SIZE, batch_size=4, resize_on_device=True)
    particles = [Image.fromarray(synthetic_particle(KINDS[i % 3], i, size=20 + 9 * i)) for i in range(7)]
    small = [to_model_input(p, SIZE, resize=False) for p in particles]
    assert [s.shape[0] for s in small] == [20, 29, 38, 47, 56, SIZE, SIZE]  # 65 and 74 px shrunk to SIZE
    host = embedder.embed([to_model_input(p, SIZE) for p in particles])
    device = on_device.embed(small)  # batches of 4 and 3, several sizes in each
    cosine = (host * device).sum(axis=1) / np.linalg.norm(host, axis=1) / np.linalg.norm(device, axis=1)
    assert cosine.min() > 0.995, cosine
    single = np.concatenate([on_device.embed([s]) for s in small])
    np.testing.assert_allclose(device, single, atol=1e-3, rtol=1e-3)
    mixed = [6, 0, 4, 2, 5, 1, 3]  # each batch resized side by side, its rows given back in the caller's order
    np.testing.assert_allclose(on_device.embed([small[i] for i in mixed]), device[mixed], atol=1e-3, rtol=1e-3)
    assert np.abs(device[0] - device[1]).max() > 1e-2


def test_empty_batch(embedder: Embedder):
    out = embedder.embed([])
    assert out.shape == (0, 1280)
    assert embedder.head_probabilities(out) is None  # efficientnet-lite0 has no head


def test_feature_bytes_round_trip():
    vec = np.random.default_rng(0).normal(size=(2, 1280)).astype(np.float32)
    back = from_bytes([to_bytes(v) for v in vec])
    assert back.shape == (2, 1280) and back.dtype == np.float32
    np.testing.assert_allclose(back, vec, rtol=1e-3, atol=1e-3)


def test_same_content_in_a_later_run_is_a_cache_hit(pipeline: EmbeddingPipeline, serve, clean_redis):
    data = png_bytes(synthetic_particle("round", 8, size=40))
    first = pipeline.run([{"id": 1, "data": {"image": serve("a.png", data)}}], "image")
    assert (first.computed, first.cache_hits) == (1, 0)
    assert clean_redis.exists(f"plk:emb:test-space:{hashlib.sha256(data).hexdigest()}")
    # Another task, another URL, the same bytes: not embedded again.
    second = pipeline.run([{"id": 2, "data": {"image": serve("b.png", data)}}], "image")
    assert (second.computed, second.cache_hits, second.errors) == (0, 1, {})
    np.testing.assert_allclose(second.features[2], first.features[1], rtol=2e-3, atol=2e-3)


def test_same_content_within_one_run_embedded_once(pipeline: EmbeddingPipeline, serve, clean_redis):
    data = [png_bytes(synthetic_particle(kind, 7, size=40)) for kind in KINDS]
    tasks = [{"id": 10 + i, "data": {"image": serve(f"p{i}.png", d)}} for i, d in enumerate(data)]
    # Task 20 has the same bytes as task 10 under another URL.
    tasks.append({"id": 20, "data": {"image": serve("copy-of-p0.png", data[0])}})

    out = pipeline.run(tasks, "image")
    assert out.errors == {}
    assert set(out.features) == {10, 11, 12, 20}
    assert out.refs[20] == tasks[3]["data"]["image"]
    assert out.computed == 3
    assert out.cache_hits == 1
    np.testing.assert_allclose(out.features[10], out.features[20], atol=1e-2)
    for d in data:
        key = f"plk:emb:test-space:{hashlib.sha256(d).hexdigest()}"
        assert clean_redis.exists(key), key
    # Each task got its own image's features.
    expected = pipeline.embedder.embed([to_model_input(decode_image(d, 10_000_000), SIZE) for d in data])
    for i in range(3):
        np.testing.assert_allclose(out.features[10 + i], expected[i], atol=1e-3)


def test_second_run_is_all_cache_hits(pipeline: EmbeddingPipeline, serve):
    tasks = [
        {"id": i, "data": {"image": serve(f"s{i}.png", png_bytes(synthetic_particle(KINDS[i % 3], i, size=40)))}}
        for i in range(6)
    ]
    first = pipeline.run(tasks, "image")
    assert (first.computed, first.cache_hits, first.errors) == (6, 0, {})
    second = pipeline.run(tasks, "image")
    assert (second.computed, second.cache_hits, second.errors) == (0, 6, {})
    for tid in range(6):
        # The cache holds float16: equal to the computed features within its precision.
        np.testing.assert_allclose(second.features[tid], first.features[tid], rtol=2e-3, atol=2e-3)


def test_bad_tasks_fail_alone(pipeline: EmbeddingPipeline, serve, image_server: ImageServer):
    good = [
        {"id": i, "data": {"image": serve(f"g{i}.png", png_bytes(synthetic_particle(KINDS[i % 3], 100 + i)))}}
        for i in range(5)
    ]
    real = {"id": 5, "data": {"image": f"{image_server.url}/data/flowcam/greyscale16/TC18_280524_4840.tif"}}
    crop = next((DATA / "flowcam" / "crops").glob("*.tif"))
    real_rgb = {"id": 6, "data": {"image": f"{image_server.url}/data/flowcam/crops/{crop.name}"}}
    broken = {"id": 101, "data": {"image": serve("broken.png", b"\x89PNG\r\n\x1a\n not really a png")}}
    missing = {"id": 102, "data": {"image": f"{image_server.url}/tmp/no-such-{uuid.uuid4().hex}.png"}}
    no_key = {"id": 103, "data": {"url": "http://example.org/a.png"}}
    tasks = [broken, *good[:2], missing, real, no_key, *good[2:], real_rgb]

    out = pipeline.run(tasks, "image")
    assert set(out.features) == {0, 1, 2, 3, 4, 5, 6}
    assert set(out.errors) == {101, 102, 103}
    assert "cannot decode image" in out.errors[101]
    assert "HTTP 404" in out.errors[102]
    assert out.errors[103] == "task 103 has no 'image' in its data"
    assert out.computed == 7 and out.cache_hits == 0
    assert all(v.shape == (1280,) and np.isfinite(v).all() for v in out.features.values())
    assert not set(out.refs) & set(out.errors)


def test_stream_settles_every_task_once_in_parts(pipeline: EmbeddingPipeline, serve):
    """Parts as the model finishes batches (of 4 here), with downloads running ahead; a copy of an image
    already embedded in this run is settled from it."""
    data = [png_bytes(synthetic_particle(KINDS[i % 3], 300 + i, size=40)) for i in range(10)]
    tasks = [{"id": i, "data": {"image": serve(f"st{i}.png", d)}} for i, d in enumerate(data)]
    tasks.append({"id": 50, "data": {"image": serve("st-copy.png", data[0])}})
    tasks.append({"id": 51, "data": {"image": serve("st-broken.png", b"not an image")}})

    parts = list(pipeline.stream(tasks, "image"))
    assert len(parts) >= 3  # 10 distinct images in batches of 4
    settled = [t for p in parts for t in (*p.features, *p.errors)]
    assert sorted(settled) == sorted(t["id"] for t in tasks), "each task settled exactly once"
    assert sum(p.computed for p in parts) == 10
    assert not any(p.unstarted for p in parts)
    merged = {t: v for p in parts for t, v in p.features.items()}
    np.testing.assert_array_equal(merged[50], merged[0])
    assert "cannot decode image" in next(p.errors[51] for p in parts if 51 in p.errors)


def test_stream_stops_within_a_batch_and_returns_the_rest(pipeline: EmbeddingPipeline, serve):
    tasks = [
        {"id": i, "data": {"image": serve(f"stop{i}.png", png_bytes(synthetic_particle(KINDS[i % 3], 400 + i)))}}
        for i in range(20)
    ]
    asked = []

    def stop() -> bool:
        asked.append(True)
        return True

    parts = list(pipeline.stream(tasks, "image", stop=stop))
    assert len(asked) == 1, "asked once, after the first batch"
    first, rest = parts
    assert first.computed == 4 and len(first.features) == 4
    # Nothing settled after the question; everything else comes back, once, to run later.
    assert not rest.features and not rest.errors
    assert sorted([*first.features, *(t["id"] for t in rest.unstarted)]) == list(range(20))
    assert all(t in tasks for t in rest.unstarted)
    # The pipeline is usable again at once: the unstarted tasks run in a later stream.
    later = pipeline.run(rest.unstarted, "image")
    assert sorted(later.features) == sorted(t["id"] for t in rest.unstarted)
