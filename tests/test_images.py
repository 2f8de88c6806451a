"""Fetching, decoding and preprocessing one task's image; every failure is a clear ImageError."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from common.settings import Settings
from tests.helpers import DATA, ImageServer, free_port, png_bytes, synthetic_particle
from worker.images import ImageError, ImageFetcher, decode_image, image_reference, to_model_input

GREY16 = DATA / "flowcam" / "greyscale16" / "TC18_280524_4840.tif"
CROPS = sorted((DATA / "flowcam" / "crops").glob("*.tif"))
BIG = 40_000_000


def settings(**changes) -> Settings:
    """The test servers listen on loopback, which the outbound guard refuses unless IMAGE_HOSTS allows it."""
    return dataclasses.replace(Settings(), **{"image_hosts": "127.0.0.1", **changes})


def respond(body: bytes, status: int = 200, content_length: bool = True) -> Callable:
    def route(handler) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", "image/png")
        if content_length:
            handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        with contextlib.suppress(OSError):  # the client may have given up (timeouts, size limits)
            handler.wfile.write(body)

    return route


@pytest.fixture
def routes(image_server: ImageServer) -> Iterator[Callable[[Callable], str]]:
    """Adds test-only routes (unique paths) to the shared image server and removes them afterwards."""
    added: list[str] = []

    def add(route: Callable, prefix: str = "/test-images") -> str:
        path = f"{prefix}/{uuid.uuid4().hex}.png"
        image_server.routes[path] = route
        added.append(path)
        return path

    yield add
    for path in added:
        image_server.routes.pop(path, None)


# -- decode ----------------------------------------------------------------------------------------


def test_16bit_greyscale_is_scaled_by_its_own_maximum():
    raw = np.asarray(Image.open(GREY16)).astype(np.float64)
    assert raw.max() == 1017 and raw.min() == 637  # what the README promises
    img = decode_image(GREY16.read_bytes(), BIG)
    assert img.mode == "RGB"
    arr = np.asarray(img)
    assert arr.shape == (*raw.shape, 3) and arr.dtype == np.uint8
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])
    assert arr.max() == 255
    # Scaled by the image's maximum, not by 65535 (which would give a nearly black image).
    expected = np.round(raw / raw.max() * 255.0)
    assert np.abs(arr[..., 0].astype(np.float64) - expected).max() <= 1
    assert arr.min() == pytest.approx(637 / 1017 * 255, abs=1)


@pytest.mark.parametrize("path", CROPS[:5], ids=lambda p: p.name)
def test_real_rgb_crop_decodes(path: Path):
    original = Image.open(path)
    img = decode_image(path.read_bytes(), BIG)
    assert img.mode == "RGB"
    assert img.size == original.size
    assert np.array_equal(np.asarray(img), np.asarray(original.convert("RGB")))


def test_real_crops_exist():
    assert len(CROPS) >= 5  # the parametrised test above needs them


def test_truncated_png_raises():
    data = png_bytes(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    with pytest.raises(ImageError, match="cannot decode image"):
        decode_image(data[: len(data) // 2], BIG)


def test_random_bytes_raise():
    data = np.random.default_rng(1).integers(0, 255, 5000, dtype=np.uint8).tobytes()
    with pytest.raises(ImageError, match="cannot decode image: UnidentifiedImageError"):
        decode_image(data, BIG)
    with pytest.raises(ImageError, match="cannot decode image"):
        decode_image(b"", BIG)


def test_too_many_pixels_raise():
    data = png_bytes(np.zeros((10, 20, 3), np.uint8))
    with pytest.raises(ImageError, match=r"200 pixels, over the 199-pixel limit \(IMAGE_MAX_PIXELS\)"):
        decode_image(data, max_pixels=199)
    assert decode_image(data, max_pixels=200).size == (20, 10)


def test_rgba_is_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 0)  # fully transparent red
    rgba[1, 1] = (0, 0, 255, 255)  # opaque blue
    rgba[2, 2] = (0, 0, 0, 128)  # half-transparent black
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    arr = np.asarray(decode_image(buf.getvalue(), BIG))
    assert arr.shape == (4, 4, 3)
    assert tuple(arr[0, 0]) == (255, 255, 255)
    assert tuple(arr[1, 1]) == (0, 0, 255)
    assert all(abs(int(v) - 127) <= 1 for v in arr[2, 2])


def test_palette_with_transparency_is_composited_on_white():
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 0
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=0)
    arr = np.asarray(decode_image(buf.getvalue(), BIG))
    assert tuple(arr[0, 0]) == (255, 255, 255)
    assert tuple(arr[0, 1]) == (0, 255, 0)


def test_8bit_greyscale_becomes_rgb():
    data = png_bytes(np.full((5, 7), 42, np.uint8))
    arr = np.asarray(decode_image(data, BIG))
    assert arr.shape == (5, 7, 3)
    assert (arr == 42).all()


# -- preprocess ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64, 224])
def test_model_input_shape(size: int):
    img = decode_image(CROPS[0].read_bytes(), BIG)
    arr = to_model_input(img, size)
    assert arr.shape == (size, size, 3)
    assert arr.dtype == np.uint8


def test_model_input_keeps_aspect_ratio():
    rod = np.full((20, 200, 3), 255, np.uint8)
    rod[5:15, :] = (10, 10, 10)  # a thin dark rod across the whole width
    arr = to_model_input(Image.fromarray(rod), 64)
    dark_rows = np.flatnonzero((arr.mean(axis=2) < 128).any(axis=1))
    dark_cols = np.flatnonzero((arr.mean(axis=2) < 128).any(axis=0))
    # 10 of 200 px at 64 px is ~3 rows; stretching to a square would make it ~32 rows.
    assert 2 <= len(dark_rows) <= 5
    assert abs(dark_rows.mean() - 31.5) < 2  # centred
    assert len(dark_cols) >= 60  # still the full width
    # The padding takes the image's own border colour (white here), not black.
    assert (arr[:10] > 245).all() and (arr[-10:] > 245).all()


@pytest.mark.parametrize("height, width", [(5, 8), (8, 5), (6, 9), (9, 6), (1, 4), (3, 2), (17, 40), (40, 17)])
def test_model_input_pads_as_pillow_pads(height: int, width: int):
    """The padding is numpy's, for speed; its pixels are those of Pillow's `ImageOps.pad` with the border's
    median colour (odd and even margins, an odd and even count of border pixels)."""
    rng = np.random.default_rng(height * 100 + width)
    arr = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    border = np.concatenate([arr[[0, -1]].reshape(-1, 3), arr[:, [0, -1]].reshape(-1, 3)])
    fill = tuple(int(v) for v in np.median(border, axis=0))
    side = max(height, width)
    expected = np.asarray(ImageOps.pad(img, (side, side), color=fill, centering=(0.5, 0.5)))
    assert np.array_equal(to_model_input(img, 64, resize=False), expected)
    resized = np.asarray(Image.fromarray(expected).resize((64, 64), Image.Resampling.BILINEAR, reducing_gap=None))
    assert np.array_equal(to_model_input(img, 64), resized)


def test_model_input_square_at_size_is_unchanged():
    img = Image.fromarray(synthetic_particle("round", 0, size=32))
    assert np.array_equal(to_model_input(img, 32), np.asarray(img))


# -- task data -------------------------------------------------------------------------------------


def test_image_reference():
    assert image_reference({"id": 1, "data": {"image": "  http://x/a.png "}}, "image") == "http://x/a.png"
    for task in ({"id": 7, "data": {}}, {"id": 7, "data": {"image": ""}}, {"id": 7}, {"id": 7, "data": {"image": 3}}):
        with pytest.raises(ImageError, match="task 7 has no 'image' in its data"):
            image_reference(task, "image")


# -- fetch -----------------------------------------------------------------------------------------


def test_fetch_real_file_over_http(image_server: ImageServer):
    fetcher = ImageFetcher(settings())
    data = fetcher.fetch(f"{image_server.url}/data/flowcam/crops/{CROPS[0].name}")
    assert data == CROPS[0].read_bytes()


def test_fetch_404(image_server: ImageServer):
    fetcher = ImageFetcher(settings())
    url = f"{image_server.url}/tmp/does-not-exist-{uuid.uuid4().hex}.png"
    with pytest.raises(ImageError, match="404") as exc:
        fetcher.fetch(url)
    assert url in str(exc.value) and not exc.value.transient


def test_fetch_over_max_bytes_declared(image_server: ImageServer):
    name = f"big-{uuid.uuid4().hex}.bin"
    (image_server.root / "tmp" / name).write_bytes(b"x" * 5000)
    fetcher = ImageFetcher(settings(image_max_bytes=1000))
    with pytest.raises(ImageError, match=r"5000 bytes, over the 1000-byte limit \(IMAGE_MAX_BYTES\)"):
        fetcher.fetch(f"{image_server.url}/tmp/{name}")
    assert ImageFetcher(settings(image_max_bytes=5000)).fetch(f"{image_server.url}/tmp/{name}") == b"x" * 5000


def test_fetch_over_max_bytes_without_content_length(image_server: ImageServer, routes):
    path = routes(respond(b"y" * 300_000, content_length=False))
    fetcher = ImageFetcher(settings(image_max_bytes=100_000))
    with pytest.raises(ImageError, match=r"over the 100000-byte limit \(IMAGE_MAX_BYTES\)"):
        fetcher.fetch(image_server.url + path)


def test_fetch_times_out(image_server: ImageServer, routes):
    def slow(handler) -> None:
        time.sleep(2.0)
        respond(b"late")(handler)

    path = routes(slow)
    fetcher = ImageFetcher(settings(download_timeout=0.5))
    start = time.monotonic()
    with pytest.raises(ImageError, match=r"timed out after 0.5 s") as exc:
        fetcher.fetch(image_server.url + path)
    assert time.monotonic() - start < 1.8 and exc.value.transient


def test_connection_refused_is_an_image_error():
    fetcher = ImageFetcher(settings(download_timeout=2))
    with pytest.raises(ImageError, match="failed: cannot connect") as exc:
        fetcher.fetch(f"http://127.0.0.1:{free_port()}/a.png")
    assert exc.value.transient


@pytest.mark.parametrize("ref", ["ftp://example.org/a.png", "file:///etc/passwd", "a.png", "C:/images/a.png"])
def test_unsupported_scheme(ref: str):
    with pytest.raises(ImageError, match="unsupported image reference"):
        ImageFetcher(settings()).fetch(ref)


def test_bad_s3_reference():
    with pytest.raises(ImageError, match="is not s3://bucket/key"):
        ImageFetcher(settings()).fetch("s3://bucket-only")


@pytest.mark.parametrize("ref", ["/data/upload/1/a.png", "data/local-files/?d=a.png"])
def test_label_studio_path_needs_url(ref: str):
    with pytest.raises(ImageError, match="LABEL_STUDIO_URL is not set"):
        ImageFetcher(settings(label_studio_url="")).fetch(ref)


def test_label_studio_path_sends_token(image_server: ImageServer, routes):
    seen: list[dict[str, str]] = []
    body = png_bytes(synthetic_particle("rod", 3))

    def record(handler) -> None:
        seen.append(dict(handler.headers))
        respond(body)(handler)

    path = routes(record, prefix="/data/upload/42")
    fetcher = ImageFetcher(settings(label_studio_url=image_server.url, label_studio_api_key="secret-key-123"))
    assert fetcher.fetch(path) == body
    assert seen[-1].get("Authorization") == "Token secret-key-123"
    # The same path without the leading slash, and an absolute URL on Label Studio's host, too.
    assert fetcher.fetch(path.lstrip("/")) == body
    assert seen[-1].get("Authorization") == "Token secret-key-123"
    assert fetcher.fetch(image_server.url + path) == body
    assert seen[-1].get("Authorization") == "Token secret-key-123"
    assert len(seen) == 3


def test_other_hosts_get_no_token(image_server: ImageServer, routes):
    seen: list[dict[str, str]] = []

    def record(handler) -> None:
        seen.append(dict(handler.headers))
        respond(b"ok")(handler)

    path = routes(record)
    fetcher = ImageFetcher(settings(label_studio_url=image_server.url, label_studio_api_key="secret-key-123",
                                    image_hosts="localhost"))  # fmt: skip
    other = image_server.url.replace("127.0.0.1", "localhost") + path
    assert fetcher.fetch(other) == b"ok"
    assert "Authorization" not in seen[-1]


def test_no_api_key_sends_no_header(image_server: ImageServer, routes):
    seen: list[dict[str, str]] = []

    def record(handler) -> None:
        seen.append(dict(handler.headers))
        respond(b"ok")(handler)

    path = routes(record, prefix="/data/upload/43")
    assert ImageFetcher(settings(label_studio_url=image_server.url)).fetch(path) == b"ok"
    assert "Authorization" not in seen[-1]


def test_refused_jwt_key_is_an_image_error(image_server: ImageServer, routes):
    """A personal access token (JWT) is exchanged first; the test server does not answer POST."""
    path = routes(respond(b"ok"), prefix="/data/upload/44")
    fetcher = ImageFetcher(settings(label_studio_url=image_server.url, label_studio_api_key="aaa.bbb.ccc"))
    with pytest.raises(ImageError, match="refused LABEL_STUDIO_API_KEY") as exc:
        fetcher.fetch(path)
    assert "aaa.bbb.ccc" not in str(exc.value)


def test_unreachable_label_studio_with_jwt_key_is_an_image_error():
    url = f"http://127.0.0.1:{free_port()}"
    fetcher = ImageFetcher(settings(label_studio_url=url, label_studio_api_key="aaa.bbb.ccc", download_timeout=2))
    with pytest.raises(ImageError, match="cannot reach Label Studio") as exc:
        fetcher.fetch("/data/upload/1/a.png")
    assert exc.value.transient  # the task layer retries it
