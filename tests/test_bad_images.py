"""A bad-image corpus, every file made here: each kind decodes to a correct image or fails its one task with
a clear reason, within bounded memory; served over HTTP in one batch with good images (and with hostile
servers: slow drip, floods, redirect loops, refused addresses), only the bad tasks fail.

`python -m tests.test_bad_images` prints what each kind returns.
"""

from __future__ import annotations

import io
import json
import os
import resource
import struct
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from tests.helpers import MeanColourEmbedder, MemoryContentCache
from tests.servers import Handler, Server, redirect, respond, running, settings
from worker.images import ImageError, ImageFetcher, decode_image, to_model_input
from worker.pipeline import EmbeddingPipeline

MAX_PIXELS = 40_000_000
SIZE = 48


# -- makers ----------------------------------------------------------------------------------------


def save(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def particle(size: tuple[int, int] = (40, 30)) -> Image.Image:
    arr = np.full((size[1], size[0], 3), 200, np.uint8)
    arr[size[1] // 3 : 2 * size[1] // 3, size[0] // 4 : 3 * size[0] // 4] = (40, 90, 160)
    return Image.fromarray(arr)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_grey(width: int, height: int, rows: int | None = None, extra: bytes = b"") -> bytes:
    """A greyscale PNG of zeros, its pixel data compressed row by row (`rows` of them: fewer is truncated)."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    idat = b"".join(comp.compress(row) for _ in range(height if rows is None else rows)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + extra + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))  # fmt: skip


def patched(data: bytes, offset: int, fmt: str, *values: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


def jpeg_with_size(width: int, height: int) -> bytes:
    data = save(particle((8, 8)), "JPEG")
    sof = data.index(b"\xff\xc0")
    return patched(data, sof + 5, ">HH", height, width)


def exif_rotated(orientation: int) -> bytes:
    arr = np.full((20, 40, 3), 255, np.uint8)
    arr[:8, :8] = (255, 0, 0)  # red marker at the top left, as stored
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def zip_bomb() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("image.png", b"\x00" * 50_000_000)
    return buf.getvalue()


def deep_tiff(arr: np.ndarray, mode: str | None = None) -> bytes:
    return save(Image.fromarray(arr, mode) if mode else Image.fromarray(arr), "TIFF")


def ramp(dtype: type, peak: float) -> np.ndarray:
    return (np.linspace(0, peak, 16 * 12).reshape(12, 16)).astype(dtype)


# -- checks ----------------------------------------------------------------------------------------


def grey_ramp(img: Image.Image) -> bool:
    arr = np.asarray(img)
    return img.size == (16, 12) and arr.max() == 255 and arr[0, 0, 0] == 0 and (arr[..., 0] == arr[..., 2]).all()


def black(size: tuple[int, int]) -> Callable[[Image.Image], bool]:
    return lambda img: img.size == size and not np.asarray(img).any()


def colour(rgb: tuple[int, int, int], size: tuple[int, int] = (8, 8), tol: int = 40) -> Callable[[Image.Image], bool]:
    return lambda img: img.size == size and np.abs(np.asarray(img).astype(int) - rgb).max() <= tol


def marker_at(corner: str, size: tuple[int, int]) -> Callable[[Image.Image], bool]:
    def check(img: Image.Image) -> bool:
        arr = np.asarray(img).astype(int)
        h, w = arr.shape[:2]
        y, x = {"top-left": (2, 2), "top-right": (2, w - 3), "bottom-left": (h - 3, 2), "bottom-right": (h - 3, w - 3)}[
            corner
        ]
        return img.size == size and arr[y, x, 0] > 200 and arr[y, x, 1] < 80

    return check


@dataclass(frozen=True)
class Kind:
    name: str
    make: Callable[[], bytes]
    expect: str | Callable[[Image.Image], bool]  # a regex of the ImageError, or a check of the image


def _float_with_nan() -> bytes:
    arr = ramp(np.float32, 3.5)
    arr[0, 1], arr[1, 0], arr[2, 2] = np.nan, np.inf, -np.inf
    return deep_tiff(arr, "F")


def _cmyk_tiff() -> bytes:
    return save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "TIFF")


def _ztxt_bomb() -> bytes:
    text = png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"a" * 50_000_000, 9))
    return png_grey(8, 8, extra=text)


def _multipage_tiff() -> bytes:
    pages = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    return save(pages[0], "TIFF", save_all=True, append_images=pages[1:])


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


NOISE = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
CORPUS = [
    Kind("16-bit greyscale TIFF", lambda: deep_tiff(ramp(np.uint16, 1017)), grey_ramp),
    Kind("16-bit greyscale PNG", lambda: save(Image.fromarray(ramp(np.uint16, 40000)), "PNG"), grey_ramp),
    Kind("32-bit integer TIFF", lambda: deep_tiff(ramp(np.int32, 70000)), grey_ramp),
    Kind("float32 TIFF", lambda: deep_tiff(ramp(np.float32, 0.25), "F"), grey_ramp),
    Kind("float32 TIFF with NaN and infinities", _float_with_nan, lambda img: img.size == (16, 12)),
    Kind("negative-only float TIFF", lambda: deep_tiff(-ramp(np.float32, 5) - 1, "F"), black((16, 12))),
    Kind("all-zero 8-bit RGB PNG", lambda: save(Image.new("RGB", (9, 7)), "PNG"), black((9, 7))),
    Kind("all-zero 16-bit TIFF", lambda: deep_tiff(np.zeros((7, 9), np.uint16)), black((9, 7))),
    Kind("all-zero float TIFF", lambda: deep_tiff(np.zeros((7, 9), np.float32), "F"), black((9, 7))),
    Kind("1-bit PNG", lambda: save(Image.new("1", (8, 8), 1), "PNG"), colour((255, 255, 255), tol=0)),
    Kind("truncated PNG", lambda: _truncated(save(Image.fromarray(NOISE), "PNG")), "cannot decode image"),
    Kind("truncated JPEG", lambda: _truncated(save(Image.fromarray(NOISE), "JPEG")), "cannot decode image"),
    Kind("truncated TIFF", lambda: _truncated(save(Image.fromarray(NOISE), "TIFF")), "cannot decode image"),
    # A complete zlib stream with 10 of 64 rows: Pillow, like browsers, shows the rest as black.
    Kind("PNG whose pixel data ends early", lambda: png_grey(64, 64, rows=10), black((64, 64))),
    Kind("zip bomb (50 MB of zeros, zipped)", zip_bomb, "not a PNG, JPEG, TIFF, BMP, GIF or WebP image"),
    Kind("PNG bomb: 8000x8000 zeros in 62 KB", lambda: png_grey(8000, 8000), r"64000000 pixels, over the 4\d+-pixel"),
    Kind("PNG text bomb (zTXt inflating to 50 MB)", _ztxt_bomb, "cannot decode image.*(Decompressed|too large)"),
    Kind("PNG header claiming 100000x100000", lambda: png_grey(100_000, 100_000, rows=1), "10000000000 pixels, over"),
    Kind(
        "GIF header claiming 65535x65535",
        lambda: patched(animated("GIF"), 6, "<HH", 65535, 65535),
        "4294836225 pixels, over the",
    ),  # fmt: skip
    Kind(
        "BMP header claiming 30000x30000",
        lambda: patched(save(particle((4, 4)), "BMP"), 18, "<ii", 30000, 30000),
        "900000000 pixels, over the",
    ),  # fmt: skip
    Kind("JPEG header claiming 65000x60000", lambda: jpeg_with_size(65000, 60000), "3900000000 pixels, over the"),
    Kind("longest side over IMAGE_MAX_SIDE (12000x200)", lambda: png_grey(12000, 200), "IMAGE_MAX_SIDE"),
    Kind("aspect ratio over IMAGE_MAX_ASPECT (5000x10)", lambda: png_grey(5000, 10), "IMAGE_MAX_ASPECT"),
    Kind("animated GIF (first frame)", lambda: animated("GIF"), colour((255, 0, 0))),
    Kind("animated PNG (first frame)", lambda: animated("PNG"), colour((255, 0, 0))),
    Kind("multi-page TIFF (first page)", _multipage_tiff, colour((255, 0, 0))),
    Kind("CMYK JPEG", lambda: save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"), colour((255, 0, 0))),
    Kind("CMYK TIFF", _cmyk_tiff, colour((255, 0, 0))),
    Kind("EXIF orientation 6 (turn right)", lambda: exif_rotated(6), marker_at("top-right", (20, 40))),
    Kind("EXIF orientation 8 (turn left)", lambda: exif_rotated(8), marker_at("bottom-left", (20, 40))),
    Kind("EXIF orientation 3 (upside down)", lambda: exif_rotated(3), marker_at("bottom-right", (40, 20))),
    Kind(
        "RGBA PNG (on white)",
        lambda: save(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "PNG"),
        colour((255, 255, 255), tol=0),
    ),
    Kind("WebP", lambda: save(Image.new("RGB", (8, 8), (255, 0, 0)), "WEBP", quality=100), colour((255, 0, 0))),
    Kind("BMP", lambda: save(Image.new("RGB", (8, 8), (255, 0, 0)), "BMP"), colour((255, 0, 0), tol=0)),
    Kind("HTML page served as image/png", lambda: b"<!doctype html><html><body>Login</body></html>", "not a PNG"),
    Kind("JSON served as image/png", lambda: json.dumps({"detail": "not found"}).encode(), "not a PNG"),
    Kind("empty file", lambda: b"", "the file is empty"),
    Kind("random bytes", lambda: np.random.default_rng(1).bytes(5000), "not a PNG"),
    Kind("a format not on the list (TGA)", lambda: save(particle(), "TGA"), "not a PNG"),
    Kind("a format not on the list (ICO)", lambda: save(particle((32, 32)), "ICO"), "not a PNG"),
    Kind("a format not on the list (PCX)", lambda: save(particle(), "PCX"), "not a PNG"),
    Kind("a format not on the list (PPM)", lambda: save(particle(), "PPM"), "not a PNG"),
]


def outcome(kind: Kind) -> str:
    """What decode + preprocess give for `kind`: 'image WxH' or the error's message."""
    try:
        img = decode_image(kind.make(), MAX_PIXELS)
        arr = to_model_input(img, SIZE)
        assert arr.shape == (SIZE, SIZE, 3)
        return f"image {img.size[0]}x{img.size[1]} {img.mode}"
    except ImageError as exc:
        return f"ImageError: {exc}"


@pytest.mark.parametrize("kind", CORPUS, ids=lambda k: k.name)
def test_each_kind_decodes_correctly_or_fails_with_a_reason(kind: Kind):
    data = kind.make()
    if isinstance(kind.expect, str):
        with pytest.raises(ImageError, match=kind.expect) as exc:
            decode_image(data, MAX_PIXELS)
        assert not exc.value.transient
    else:
        img = decode_image(data, MAX_PIXELS)
        assert img.mode == "RGB" and kind.expect(img), (img.size, np.asarray(img)[:3, :3].tolist())
        assert to_model_input(img, SIZE).shape == (SIZE, SIZE, 3)


def test_the_corpus_has_the_kinds_asked_for():
    assert len(CORPUS) >= 40


def test_wide_image_is_shrunk_before_padding_in_bounded_memory():
    """40000x1000: the old pad-then-resize made a 40000x40000x3 array (4.8 GB). Run in a process of its own
    with 1 GiB of address space: decoding (120 MB) fits, a padding bomb would not."""
    code = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
import numpy as np
from PIL import Image
from tests.test_bad_images import png_grey
from worker.images import decode_image, to_model_input
img = decode_image(png_grey(40000, 1000), 40_000_000, max_side=50_000, max_aspect=100)
arr = to_model_input(img, 48)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forked parent (pytest, with torch loaded).
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(img.size, arr.shape, hwm // 1024)
"""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    size, shape, peak_mib = done.stdout.strip().rsplit(" ", 1)[0], None, int(done.stdout.split()[-1])
    assert "(40000, 1000) (48, 48, 3)" in done.stdout, done.stdout
    assert peak_mib < 600, f"peak {peak_mib} MiB ({size}, {shape})"
    # And by default such an image is refused from its header, before any pixel is decoded.
    with pytest.raises(ImageError, match="IMAGE_MAX_SIDE"):
        decode_image(png_grey(40000, 1000, rows=1), MAX_PIXELS)


def animated_webp_declaring(width: int, height: int) -> bytes:
    """A two-frame animated WebP of 1x1 pixels whose canvas (VP8X header) claims `width` x `height`."""
    frames = [Image.new("RGB", (1, 1), (80 * i, 0, 0)) for i in range(2)]
    data = bytearray(save(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True))
    assert data[12:16] == b"VP8X"
    data[24:27], data[27:30] = (width - 1).to_bytes(3, "little"), (height - 1).to_bytes(3, "little")
    return bytes(data)


def float_tiff(side: int) -> bytes:
    """A float TIFF of side x side pixels, mostly zeros: a quarter of a MiB, deflated, at 6324 px."""
    arr = np.zeros((side, side), np.float32)
    arr[::97, ::89] = 1.5
    return save(Image.fromarray(arr, "F"), "TIFF", compression="tiff_adobe_deflate")


def run_measured(code: str) -> str:
    """`code` in a process of its own (the worker's allocator setting applied), its output."""
    head = "from worker.allocator import retain_freed_memory; retain_freed_memory()\n"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", head + code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


STATUS = """
def status(key):
    return next(int(line.split()[1]) // 1024 for line in open("/proc/self/status") if line.startswith(key))
"""


def test_pillows_own_bomb_check_refuses_a_huge_canvas_before_allocating_it():
    """A 138-byte animated WebP declaring 16383x16383: Pillow's decoder allocates the canvas inside
    Image.open, before our header check. With Pillow's check on at IMAGE_MAX_PIXELS, it is refused first:
    the process's address space grows by a few MiB, not 2 GB."""
    out = run_measured(
        STATUS
        + f"""
from worker.images import ImageError, decode_image
data = {animated_webp_declaring(16383, 16383)!r}
before = status("VmPeak:")
try:
    decode_image(data, {MAX_PIXELS})
except ImageError as exc:
    print(exc)
print(status("VmPeak:") - before)
"""
    )
    message, grown = out.strip().rsplit("\n", 1)
    assert "IMAGE_MAX_PIXELS" in message, out
    assert int(grown) < 64, f"opening it took {grown} MiB of address space"


def test_large_decodes_take_turns_in_a_process(tmp_path):
    """A 6324x6324 float TIFF (40 million pixels, a quarter of a MiB) costs hundreds of MiB to decode. Three
    download threads decoding one each at once cost a process one decode's working set and the images
    handed back, not three working sets (with the worker's allocator setting, which keeps freed memory;
    measured: one +462 MiB, three +654; before, +829 and +2,325)."""
    tiff = tmp_path / "float.tif"
    tiff.write_bytes(float_tiff(6324))
    code = (
        STATUS
        + f"""
import threading
from worker.images import decode_image
data = open({str(tiff)!r}, "rb").read()
before = status("VmHWM:")
threads = [threading.Thread(target=decode_image, args=(data, {MAX_PIXELS})) for _ in range(THREADS)]
[t.start() for t in threads]
[t.join() for t in threads]
print(status("VmHWM:") - before)
"""
    )
    one = int(run_measured(code.replace("THREADS", "1")))
    three = int(run_measured(code.replace("THREADS", "3")))
    assert three < 1.6 * one, f"one decode: +{one} MiB; three at once: +{three} MiB"


# -- one batch over HTTP: good images, the corpus, and hostile servers -------------------------------


@pytest.fixture
def hostile() -> Iterator[tuple[Server, threading.Event]]:
    stop = threading.Event()

    def drip(handler: Handler) -> None:
        try:
            handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 900\r\n\r\n")
            for _ in range(900):
                if stop.wait(0.05):
                    break
                handler.wfile.write(b"x")
                handler.wfile.flush()
        except OSError:
            pass
        handler.close_connection = True

    def flood(handler: Handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "image/png")
        handler.send_header("Connection", "close")
        handler.end_headers()
        try:
            while not stop.is_set():
                handler.wfile.write(b"\x89PNG" * 16384)
        except OSError:
            pass
        handler.close_connection = True

    with running() as srv:
        srv.routes.update({"/drip.png": drip, "/flood.png": flood, "/loop.png": redirect("/loop.png"),
                           "/gone.png": respond(b"", 404), "/busy.png": respond(b"", 503),
                           "/to-metadata.png": redirect("http://169.254.169.254/latest/meta-data/")})  # fmt: skip
        yield srv, stop
        stop.set()


def test_one_batch_with_every_bad_kind_fails_only_the_bad_tasks(hostile: tuple[Server, threading.Event]):
    srv, _ = hostile
    tasks, expected = [], {}
    for i in range(6):  # good particles, distinct content
        path = f"/good-{i}.png"
        srv.routes[path] = respond(save(particle((30 + i, 20 + i)), "PNG"))
        tasks.append({"id": i, "data": {"image": srv.url + path}})
    for n, kind in enumerate(CORPUS, start=100):
        path = f"/corpus-{n}.png"
        srv.routes[path] = respond(kind.make())  # served as image/png, whatever it is
        tasks.append({"id": n, "data": {"image": srv.url + path}})
        expected[n] = kind.expect if isinstance(kind.expect, str) else None
    hostile_refs = {200: ("/drip.png", "timed out after 2 s"), 201: ("/flood.png", "over the 1000000-byte limit"),
                    202: ("/loop.png", "redirect loop"), 203: ("/gone.png", "answered HTTP 404"),
                    204: ("/busy.png", "answered HTTP 503"), 205: ("/to-metadata.png", "refused: 169.254.169.254"),
                    206: ("http://10.1.2.3/x.png", "refused: 10.1.2.3"),
                    207: ("ftp://a/b.png", "unsupported")}  # fmt: skip
    for tid, (ref, reason) in hostile_refs.items():
        tasks.append({"id": tid, "data": {"image": ref if "://" in ref else srv.url + ref}})
        expected[tid] = reason
    tasks.append({"id": 300, "data": {}})
    expected[300] = "has no 'image'"

    fetcher = ImageFetcher(settings(image_hosts="127.0.0.1", download_timeout=2.0, image_max_bytes=1_000_000))
    pipeline = EmbeddingPipeline(MeanColourEmbedder(SIZE), fetcher, MemoryContentCache(), 8, MAX_PIXELS)  # type: ignore[arg-type]
    start = time.monotonic()
    out = pipeline.run(tasks, "image")
    elapsed = time.monotonic() - start
    pipeline.close()

    assert set(out.features) == {i for i in range(6)} | {n for n, e in expected.items() if e is None}
    assert set(out.errors) == {n for n, e in expected.items() if e is not None}
    for tid, message in out.errors.items():
        assert expected[tid] and __import__("re").search(expected[tid], message), (tid, message)
    assert out.transient == {200, 204}  # the slow drip (a timeout) and the 503
    assert elapsed < 10, elapsed  # the slow servers cost one deadline each, in parallel


if __name__ == "__main__":  # the corpus and what each kind returns, for the record
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    for kind in CORPUS:
        print(f"| {kind.name} | {outcome(kind)} |")
