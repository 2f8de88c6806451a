"""Getting a task's image: fetch the bytes (Label Studio paths read from disk or over HTTP, other http(s)
URLs, S3), decode, and preprocess.

Every failure is an `ImageError` whose message says what went wrong for that one task (URLs redacted, no
secret in it); the rest of a batch goes on. `transient` says whether the same fetch may work later.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import posixpath
import re
import stat
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from common.redact import redact, redact_url
from common.settings import Settings
from worker.http_client import FetchError, HttpClient, OutboundGuard, origin

log = logging.getLogger(__name__)

# Pillow's own decompression-bomb check stays on, at the project's limit (`decode_image` sets it): for some
# formats Pillow allocates before returning from Image.open (an animated WebP declaring 16383x16383 took 2 GB
# of address space), before the header check below could refuse it. Pillow refuses an image of more than
# twice MAX_IMAGE_PIXELS and warns above it; our own check, with a clear message, refuses above the limit.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)
# Decodes that hold more than this at their peak run in one thread of the process, one after the other: a
# float TIFF of 40 million pixels is a quarter of a MiB on the wire and half a GiB decoded, and a worker process
# has several download and read threads. One thread, not a lock: glibc keeps what a thread freed in that
# thread's own arena, so large decodes taking turns in every download thread would still leave one working
# set per thread behind.
LARGE_DECODE_BYTES = 64 * 1024 * 1024
_large_decoder: tuple[int, ThreadPoolExecutor] | None = None
_large_decoder_lock = threading.Lock()
# Deep greyscale is scaled to 8 bits this many pixels at a time (bounded temporaries).
SCALE_BLOCK_PIXELS = 1 << 20

# What Pillow may open (Image.open tries only these): the formats Label Studio shows as images (JPEG includes
# the MPO variant many cameras write). Everything else (PSD, EPS, ICO, TGA, PCX, ...) is refused unparsed.
FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "GIF", "WEBP")
FORMATS_SHOWN = "PNG, JPEG, TIFF, BMP, GIF or WebP"
DEEP_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I;16S", "I", "F"})
RETRY_STATUSES = frozenset({408, 425, 429})
PAD_LIMIT = 1024  # longest side padded to a square as it is; longer images are shrunk first


class ImageError(Exception):
    """One task's image cannot be used. The message is shown in the job status and the log.

    `transient`: the same fetch may work later (an allowed host refused or reset the connection, a
    timeout, HTTP 429 or 5xx, Label Studio unreachable for the token exchange); False for everything else
    (404, decode errors, limits, refused addresses)."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild_image_error, (str(self), self.transient)


def _rebuild_image_error(message: str, transient: bool) -> ImageError:
    return ImageError(message, transient=transient)


def _from_fetch(exc: FetchError) -> ImageError:
    return ImageError(str(exc), transient=exc.transient)


def image_reference(task: Mapping[str, Any], image_key: str) -> str:
    data = task.get("data")
    value = data.get(image_key) if isinstance(data, Mapping) else None
    if not isinstance(value, str) or not value.strip():
        raise ImageError(f"task {task.get('id')} has no '{image_key}' in its data")
    return value.strip()


# -- Label Studio paths ----------------------------------------------------------------------------

LABEL_STUDIO_PATHS = "/data/upload/..., /data/local-files/?d=... or /tasks/<id>/presign/?fileuri=..."
_STORAGE_PATH = re.compile(r"/(tasks|projects)/([0-9]+)/(presign|resolve)/?")


@dataclass(frozen=True)
class LabelStudioTarget:
    """A Label Studio file path, normalised: `kind` upload, local-files or storage; `rel` the file's path
    under its root (uploads and local files); `request` the path and query to ask Label Studio for."""

    kind: str
    rel: str
    request: str


def label_studio_target(ref: str) -> LabelStudioTarget:
    """The normalised target of a Label Studio path (`/data/upload/1/a.png`, `data/local-files/?d=x/a.png`,
    `/tasks/5/presign/?fileuri=...`). Anything else, `..` escaping to `/api/...` included, is refused."""
    shown = redact_url(ref)
    parts = urlsplit("/" + ref.lstrip("/"))
    path = unquote(parts.path)
    if "\x00" in path:
        raise ImageError(f"{shown}: not a Label Studio image path")
    norm = "/" + posixpath.normpath(path).lstrip("/")
    query = parse_qs(parts.query, keep_blank_values=True)
    if norm.startswith("/data/upload/"):
        rel = norm[len("/data/upload/") :]
        return LabelStudioTarget("upload", rel, "/data/upload/" + quote(rel, safe="/"))
    if norm == "/data/local-files":
        values = query.get("d", [])
        if len(values) != 1 or not values[0].strip() or "\x00" in values[0]:
            raise ImageError(f"{shown}: a local-files path needs one ?d=<path>")
        rel = posixpath.normpath(values[0]).lstrip("/")  # what Label Studio does with it
        if rel in (".", "..") or rel.startswith("../"):
            raise ImageError(f"{shown}: the path escapes LOCAL_FILES_DOCUMENT_ROOT: not fetched")
        return LabelStudioTarget("local-files", rel, "/data/local-files/?d=" + quote(rel, safe="/"))
    match = _STORAGE_PATH.fullmatch(norm)
    if match:
        values = query.get("fileuri", [])
        if len(values) != 1 or not values[0]:
            raise ImageError(f"{shown}: a storage path needs one ?fileuri=<uri>")
        kind, ident, verb = match.groups()
        return LabelStudioTarget("storage", "", f"/{kind}/{ident}/{verb}/?" + urlencode({"fileuri": values[0]}))
    raise ImageError(f"{shown}: not a Label Studio image path ({LABEL_STUDIO_PATHS})")


class _OutsideRoot(Exception):
    pass


# Linux: a path is resolved once, by the kernel, into a handle that opens nothing for reading (O_PATH), and
# its real path is read back from /proc, so the file checked is the file read. os.path.realpath walks the
# path in Python, one lstat a component (17 us a particle against 26), and leaves a moment between the check
# and the open in which a folder on the path can be swapped for a link.
_BY_HANDLE = hasattr(os, "O_PATH") and os.path.isdir("/proc/self/fd")
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK


def read_under(root: str, rel: str, max_bytes: int) -> bytes | None:
    """The file `rel` under `root` (a resolved folder), or None when it is not there (or not readable by
    this process). `_OutsideRoot` when its real path leaves the root (a symbolic link out of it), or when the
    file has other hard links, which may lie anywhere on its file system (a hard link in the root to a file
    outside it has no path that says so): nothing outside the root is opened for reading, and the file read
    is the one whose path was checked."""
    try:
        fd, by_handle = _open_under(root, os.path.join(root, rel))
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(f"{rel} is not a regular file")
        if info.st_nlink > 1:
            raise _OutsideRoot(f"{rel} (one of {info.st_nlink} hard links)")
        if info.st_size > max_bytes:
            raise ImageError(f"{rel} is {info.st_size} bytes, over the {max_bytes}-byte limit (IMAGE_MAX_BYTES)")
        data = _read_at_most(fd, max_bytes + 1, info.st_size + 1, reopen=by_handle)
    except OSError as exc:
        raise ImageError(f"cannot read {rel}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if data is None:
        return None
    if len(data) > max_bytes:
        raise ImageError(f"{rel} is over the {max_bytes}-byte limit (IMAGE_MAX_BYTES)")
    return data


def _open_under(root: str, path: str) -> tuple[int, bool]:
    """A handle on what `path` leads to, once its real path is known to lie under `root` (`_OutsideRoot`
    otherwise), and whether it is an O_PATH handle (to be opened again for reading). Linux: an O_PATH
    handle, opened by the kernel's one walk of the path; elsewhere the real path opened for reading (not
    following a link swapped in since)."""
    if not _BY_HANDLE:
        real = os.path.realpath(path, strict=True)
        _check_under(root, real)
        return os.open(real, _READ_FLAGS | os.O_NOFOLLOW), False
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        _check_under(root, os.readlink(f"/proc/self/fd/{fd}"))
    except BaseException:
        os.close(fd)
        raise
    return fd, True


def _check_under(root: str, real: str) -> None:
    if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
        raise _OutsideRoot(real)


def _read_at_most(fd: int, limit: int, expected: int, *, reopen: bool) -> bytes | None:
    """Up to `limit` bytes of the file behind `fd` (None: this process may not read it); `reopen`: `fd` is
    an O_PATH handle, opened for reading here. `expected`: the size to ask for first. A read of `limit`
    (IMAGE_MAX_BYTES, 20 MiB) allocated that much for each small particle, and cost a third of a worker
    process's CPU per particle outside the model, its download threads contending for the memory map
    (bench/RESULTS.md)."""
    if reopen:
        try:
            fd = os.open(f"/proc/self/fd/{fd}", _READ_FLAGS)  # the same file, now opened for reading
        except PermissionError:
            return None
    try:
        parts: list[bytes] = []
        while limit > 0 and (part := os.read(fd, min(limit, max(expected, 1 << 16)))):
            parts.append(part)
            limit -= len(part)
        return b"".join(parts)
    finally:
        if reopen:
            os.close(fd)


def _folder(path: str) -> str | None:
    if not path:
        return None
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        log.warning("%s is not a folder this worker can see: its files are fetched over HTTP", path)
        return None
    return real


# -- Label Studio credentials ----------------------------------------------------------------------


def _is_jwt(token: str) -> bool:
    parts = token.split(".")
    return len(parts) == 3 and all(parts)


class LabelStudioAuth:
    """Headers for Label Studio's own file URLs. A personal access token (a JWT refresh token) is not
    accepted there: it is exchanged at /api/token/refresh/ for a short-lived access token first."""

    def __init__(self, base_url: str, api_key: str, http: HttpClient) -> None:
        self.base_url = base_url
        self.api_key = api_key
        self.http = http
        self._access: str | None = None
        self._expires = 0.0
        self._lock = threading.Lock()

    def secrets(self) -> list[str]:
        return [s for s in (self.api_key, self._access) if s]

    def headers(self, refresh: bool = False) -> dict[str, str]:
        if not self.api_key:
            return {}
        if not _is_jwt(self.api_key):
            return {"Authorization": f"Token {self.api_key}"}
        with self._lock:
            if refresh or self._access is None or time.time() > self._expires:
                self._access = self._exchange()
                self._expires = time.time() + _jwt_lifetime(self._access) - 30
            return {"Authorization": f"Bearer {self._access}"}

    def _exchange(self) -> str:
        try:
            status, body = self.http.post_json(f"{self.base_url}/api/token/refresh/", {"refresh": self.api_key})
        except FetchError as exc:  # Label Studio down or restarting: the task layer tries again later
            raise ImageError(
                f"cannot reach Label Studio to exchange LABEL_STUDIO_API_KEY: {exc}", transient=True
            ) from None
        if status != 200:
            transient = status >= 500 or status in RETRY_STATUSES
            raise ImageError(f"Label Studio refused LABEL_STUDIO_API_KEY ({status})", transient=transient)
        try:
            access = json.loads(body)["access"]
            if not isinstance(access, str) or not access:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise ImageError("Label Studio's token exchange answered without an access token") from None
        return access


def _jwt_lifetime(token: str) -> float:
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return max(0.0, float(claims["exp"]) - time.time())
    except (ValueError, KeyError, IndexError, TypeError, binascii.Error):
        return 60.0


# -- the fetcher -----------------------------------------------------------------------------------


_Read = TypeVar("_Read", bound=bytes | None)


class ImageFetcher:
    """Thread-safe: one per worker process, used from the download threads.

    Label Studio paths are read from disk when the worker sees the same folders as Label Studio
    (`LOCAL_FILES_DOCUMENT_ROOT` for local files, `LABEL_STUDIO_BASE_DATA_DIR`/media for uploads), else
    over HTTP from `LABEL_STUDIO_URL` with its key. Other URLs go through the outbound guard, never with
    the key; `s3://` through boto3 with the worker's own credentials."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.guard = OutboundGuard.from_settings(settings)
        self.http = HttpClient(self.guard, settings.download_timeout, settings.image_max_bytes)
        self.ls_url = settings.label_studio_url.rstrip("/")
        self.ls_auth = LabelStudioAuth(self.ls_url, settings.label_studio_api_key, self.http)
        base = getattr(settings, "label_studio_base_data_dir", "")
        # The folder each kind of Label Studio file path (`LabelStudioTarget.kind`) is read from; None: HTTP.
        self.roots: dict[str, str | None] = {
            "local-files": _folder(getattr(settings, "local_files_document_root", "")),
            "upload": _folder(os.path.join(base, "media", "upload")) if base else None,
        }
        self._s3: Any = None
        self._s3_lock = threading.Lock()

    def fetch(self, ref: str) -> bytes:
        return self._guarded(self._fetch, ref)

    def read_from_disk(self, ref: str) -> bytes | None:
        """The Label Studio file `ref` names, read from this host's disk; None when it is not there (a folder
        this worker does not see, no such file, a real path outside the folder): `fetch` then says why and
        asks Label Studio. Never a network call, so the pipeline's read threads never wait on one."""
        return self._guarded(self._read_from_disk, ref)

    def _guarded(self, fetch: Callable[[str], _Read], ref: str) -> _Read:
        try:
            return fetch(ref.strip())
        except ValueError as exc:  # urlsplit's own complaints (an unclosed [, a bad port)
            raise ImageError(f"{redact_url(ref)[:200]!r} is not a valid URL ({exc})") from None
        except ImageError as exc:
            secrets = [*self.ls_auth.secrets(), os.environ.get("AWS_SECRET_ACCESS_KEY", "")]
            raise ImageError(redact(str(exc), secrets), transient=exc.transient) from None

    def _fetch(self, ref: str) -> bytes:
        if ref.startswith("s3://"):
            return self._fetch_s3(ref)
        scheme = urlsplit(ref).scheme.lower() if "://" in ref else ""
        if scheme in ("http", "https"):
            relative = self._under_label_studio(ref)
            if relative is None:
                return self._get(ref, label_studio=False)
            return self._fetch_label_studio(relative, ref)
        if ref.startswith("/") or ref.startswith("data/"):
            return self._fetch_label_studio(ref, ref)
        raise ImageError(f"unsupported image reference {redact_url(ref)[:200]!r} (expected http(s)://, /data/... "
                         "or s3://)")  # fmt: skip

    def reads_locally(self, ref: str) -> bool:
        """Whether `ref` looks like a Label Studio file that this worker reads from its own disk (a guess from
        its form, for the pipeline's choice of thread: a file `read_from_disk` does not find is then fetched)."""
        path = (self._as_label_studio_path(ref.strip()) or "").lstrip("/")
        if path.startswith("data/local-files"):
            return self.roots["local-files"] is not None
        return path.startswith("data/upload/") and self.roots["upload"] is not None

    def _as_label_studio_path(self, ref: str) -> str | None:
        """`ref` as a path on Label Studio: a URL under LABEL_STUDIO_URL made relative, a path as it is; None
        for a URL anywhere else."""
        return self._under_label_studio(ref) if "://" in ref else ref

    def _read_from_disk(self, ref: str) -> bytes | None:
        if not (path := self._as_label_studio_path(ref)):
            return None
        try:
            return self._from_disk(label_studio_target(path))
        except _OutsideRoot:
            return None

    def _from_disk(self, target: LabelStudioTarget) -> bytes | None:
        root = self.roots.get(target.kind)
        if root is None or not target.rel:
            return None
        return read_under(root, target.rel, self.settings.image_max_bytes)

    def _under_label_studio(self, url: str) -> str | None:
        """The path and query of `url` relative to LABEL_STUDIO_URL when it is on Label Studio's origin and
        under its base path; None for any other URL."""
        if not self.ls_url:
            return None
        try:
            mine, base = urlsplit(url), urlsplit(self.ls_url)
            same = origin(url) == origin(self.ls_url)
        except ValueError:
            return None
        prefix = base.path.rstrip("/")
        if not same or not (mine.path == prefix or mine.path.startswith(prefix + "/")):
            return None
        return mine.path[len(prefix) :] + (f"?{mine.query}" if mine.query else "")

    def _fetch_label_studio(self, ref: str, shown: str) -> bytes:
        target = label_studio_target(ref)
        outside = False
        try:
            data = self._from_disk(target)
        except _OutsideRoot:
            # Never read by this process; Label Studio decides, over HTTP, with its own rules.
            log.warning(
                "%s may lead out of %s (a link): not read from disk", redact_url(shown), self.roots[target.kind]
            )
            outside = True
        else:
            if data is not None:
                return data
        if not self.ls_url:
            where = " (a link out of the folder it names, or a file with hard links: not read)" if outside else ""
            raise ImageError(f"{redact_url(shown)} is a Label Studio path{where} but LABEL_STUDIO_URL is not set")
        return self._get(self.ls_url + target.request, label_studio=True)

    def _get(self, url: str, label_studio: bool) -> bytes:
        try:
            resp = self.http.get(url, self.ls_auth.headers() if label_studio else None)
            if resp.status == 401 and label_studio and _is_jwt(self.settings.label_studio_api_key):
                resp = self.http.get(url, self.ls_auth.headers(refresh=True))
        except FetchError as exc:
            raise _from_fetch(exc) from None
        if resp.status != 200:
            via = f" (redirected to {redact_url(resp.url)})" if resp.url != url else ""
            transient = resp.status >= 500 or resp.status in RETRY_STATUSES
            raise ImageError(f"GET {redact_url(url)} answered HTTP {resp.status}{via}", transient=transient)
        return resp.body

    def _s3_client(self) -> Any:
        with self._s3_lock:
            if self._s3 is None:
                import boto3
                from botocore.config import Config

                timeout = self.settings.download_timeout
                config = Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 2})
                self._s3 = boto3.client("s3", endpoint_url=self.settings.s3_endpoint_url or None, config=config)
            return self._s3

    def _fetch_s3(self, ref: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
        from botocore.exceptions import ConnectionError as BotoConnectionError

        parsed = urlsplit(ref)
        bucket, key = parsed.netloc, parsed.path.lstrip("/")
        if not bucket or not key:
            raise ImageError(f"{redact_url(ref)} is not s3://bucket/key")
        limit = self.settings.image_max_bytes
        try:
            obj = self._s3_client().get_object(Bucket=bucket, Key=key)
            if obj.get("ContentLength", 0) > limit:
                obj["Body"].close()
                raise ImageError(f"{redact_url(ref)} is over the {limit}-byte limit (IMAGE_MAX_BYTES)")
            data = obj["Body"].read(limit + 1)
        except ClientError as exc:
            meta = exc.response.get("ResponseMetadata", {}) if isinstance(exc.response, dict) else {}
            status = int(meta.get("HTTPStatusCode") or 0)
            code = str(exc.response.get("Error", {}).get("Code", "")) if isinstance(exc.response, dict) else ""
            transient = (
                status >= 500 or status in RETRY_STATUSES or code in ("SlowDown", "Throttling", "RequestTimeout")
            )
            raise ImageError(f"cannot read {redact_url(ref)}: {exc}", transient=transient) from None
        except (BotoConnectionError, HTTPClientError) as exc:
            raise ImageError(f"cannot read {redact_url(ref)}: {exc}", transient=True) from None
        except BotoCoreError as exc:
            raise ImageError(f"cannot read {redact_url(ref)}: {exc}") from None
        if len(data) > limit:
            raise ImageError(f"{redact_url(ref)} is over the {limit}-byte limit (IMAGE_MAX_BYTES)")
        return data


# -- decode ----------------------------------------------------------------------------------------


def decode_image(
    data: bytes,
    max_pixels: int,
    *,
    max_side: int = Settings.image_max_side,
    max_aspect: float = Settings.image_max_aspect,
) -> Image.Image:
    """A PNG, JPEG, TIFF, BMP, GIF or WebP image as 8-bit RGB, upright (EXIF orientation applied), the first
    frame of an animation. Greyscale deeper than 8 bits (FlowCam and cytometer TIFFs, float TIFFs) is scaled
    by its own maximum to 0..1, then replicated to three channels; transparency is composited on white.

    The size is checked from the header, before any pixel is decoded: over `max_pixels` pixels, a side
    over `max_side` or an aspect ratio over `max_aspect` is an ImageError, as is anything undecodable."""
    if not data:
        raise ImageError("cannot decode image: the file is empty")
    # Pillow errors above twice this: the project's limit. One value per process (the settings'), so the
    # assignment from several threads is harmless.
    Image.MAX_IMAGE_PIXELS = max(1, max_pixels // 2)
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:  # the header's size, refused by Pillow (it says no more)
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = found.group(1) if found else "more"
        raise ImageError(f"image of {pixels} pixels, over the {max_pixels}-pixel limit (IMAGE_MAX_PIXELS)") from None
    except UnidentifiedImageError:
        raise ImageError(f"cannot decode image: UnidentifiedImageError: not a {FORMATS_SHOWN} image "
                         f"({_what_it_is(data)})") from None  # fmt: skip
    except Exception as exc:
        raise ImageError(f"cannot decode image: {type(exc).__name__}: {_short(exc)}") from None
    width, height = img.size
    what = f"{img.format} image is {width}x{height}"
    if width < 1 or height < 1:
        raise ImageError(f"{what}: no pixels")
    if width * height > max_pixels:
        raise ImageError(f"{what}, over the {max_pixels}-pixel limit (IMAGE_MAX_PIXELS)")
    if max(width, height) > max_side:
        raise ImageError(f"{what}, its longest side over the {max_side}-pixel limit (IMAGE_MAX_SIDE)")
    if max(width, height) / min(width, height) > max_aspect:
        raise ImageError(f"{what}, an aspect ratio over the {max_aspect:g}:1 limit (IMAGE_MAX_ASPECT)")
    try:
        if _decode_bytes(img) > LARGE_DECODE_BYTES:
            return _large_decodes().submit(_load_rgb, img).result()
        return _load_rgb(img)
    except ImageError:
        raise
    except Exception as exc:  # truncated, corrupt, a decoder's own limit, an unsupported mode
        raise ImageError(f"cannot decode image ({what}): {type(exc).__name__}: {_short(exc)}") from None


def _what_it_is(data: bytes) -> str:
    head = data[:64].lstrip()
    for start, what in ((b"<", "HTML or XML: an error or login page?"), (b"{", "JSON"), (b"[", "JSON"),
                        (b"PK\x03\x04", "a zip archive"), (b"\x1f\x8b", "gzip data"), (b"%PDF", "a PDF")):  # fmt: skip
        if head.startswith(start):
            return f"it is {what}"
    return f"it starts with {data[:8]!r}"


def _short(exc: BaseException) -> str:
    return str(exc)[:200] or type(exc).__name__


def _deep_to_8_bits(raw: np.ndarray) -> np.ndarray:
    """Greyscale deeper than 8 bits scaled by its own finite maximum to 0..255 (NaN and infinities as 0), a block
    of rows at a time: the float copies of a 40-million-pixel image would be 160 MB each."""
    rows = max(1, SCALE_BLOCK_PIXELS // max(1, raw.shape[1] if raw.ndim > 1 else 1))
    blocks = [raw[start : start + rows] for start in range(0, raw.shape[0], rows)]
    peak = 0.0
    for block in blocks:
        values = block.astype(np.float32)
        finite = np.isfinite(values)
        if finite.any():
            peak = max(peak, float(values[finite].max()))
    grey = np.zeros(raw.shape, np.uint8)
    if peak <= 0:
        return grey
    for start, block in zip(range(0, raw.shape[0], rows), blocks, strict=True):
        values = block.astype(np.float32)
        values[~np.isfinite(values)] = 0.0
        values *= 255.0 / peak
        values += 0.5
        np.clip(values, 0, 255, out=values)
        grey[start : start + rows] = values.astype(np.uint8)
    return grey


def _has_orientation(img: Image.Image) -> bool:
    """Whether the EXIF (or TIFF) orientation asks for a turn. Most images carry none, and asking first
    spares `exif_transpose`'s copy; an unreadable orientation is no orientation."""
    try:
        if img.format == "TIFF":
            return img.tag_v2.get(0x0112, 1) != 1  # type: ignore[attr-defined]
        return "exif" in img.info and img.getexif().get(0x0112, 1) != 1
    except Exception:
        return False


def _load_rgb(img: Image.Image) -> Image.Image:
    img.load()
    img = ImageOps.exif_transpose(img) if _has_orientation(img) else img
    return _to_rgb(img)


def _large_decodes() -> ThreadPoolExecutor:
    """This process's one thread for large decodes (made in the process that uses it, after any fork)."""
    global _large_decoder
    with _large_decoder_lock:
        if _large_decoder is None or _large_decoder[0] != os.getpid():
            _large_decoder = (os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="large-decode"))
        return _large_decoder[1]


def _decode_bytes(img: Image.Image) -> int:
    """About what decoding `img` and making it 8-bit RGB hold at their peak: its pixels as decoded, and the
    8-bit and RGB copies (deep greyscale: also its raw copy, and a float block at a time)."""
    pixels = img.size[0] * img.size[1]
    if img.mode in DEEP_MODES:
        return pixels * (2 * 4 + 1 + 3)
    return pixels * (len(img.getbands()) + 3)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in DEEP_MODES:
        return Image.fromarray(_deep_to_8_bits(np.asarray(img)), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


# -- preprocess ------------------------------------------------------------------------------------


def to_model_input(img: Image.Image, size: int, *, resize: bool = True) -> np.ndarray:
    """Pad to a square with the image's own border colour (aspect ratio kept), resize to `size`.

    An image longer than `PAD_LIMIT` (or twice `size`) is first shrunk by a whole factor (box filter) to
    within it, so that a 40000x1000 image is padded as 1000x25, never as a 40000x40000 array; smaller ones
    (every particle) are padded as they are.

    `resize=False` (the GPU worker, which resizes whole batches on the card): a square smaller than `size`
    is returned at its own size; larger ones are still shrunk here, so no input is bigger than the model's.

    Returns uint8 HxWx3; scaling to float and normalising happen on the model's device.
    """
    width, height = img.size
    limit = max(PAD_LIMIT, 2 * size)
    if max(width, height) > limit:
        img = img.reduce(-(-max(width, height) // limit))
        width, height = img.size
    arr = np.asarray(img, dtype=np.uint8)
    if width != height:
        arr = _pad_to_square(arr)
    side = arr.shape[0]
    if side > size or (side < size and resize):
        resized = Image.fromarray(arr).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
        return np.asarray(resized, dtype=np.uint8)
    return arr


def _pad_to_square(arr: np.ndarray) -> np.ndarray:
    """`arr` (HxWx3) centred on a square of the median colour of its border, placed as `ImageOps.pad` places
    it (the same pixels), in numpy: `to_model_input` took 68-73 us a particle with Pillow's pad, 30 this way,
    and a GPU worker pads every particle (bench/RESULTS.md, *The host side of a GPU worker*)."""
    height, width = arr.shape[:2]
    side = max(height, width)
    border = np.concatenate((arr[0], arr[-1], arr[:, 0], arr[:, -1]))
    square = np.empty((side, side, 3), np.uint8)
    square.reshape(side, 3 * side)[:] = np.tile(_median_colour(border), side)  # by rows: 3 values broadcast slowly
    top, left = round((side - height) / 2), round((side - width) / 2)
    square[top : top + height, left : left + width] = arr
    return square


def _median_colour(pixels: np.ndarray) -> np.ndarray:
    """The per-channel median of N x 3 uint8 pixels, rounded down: what `np.median` gives, truncated, in a
    quarter of its time on a particle's border."""
    ordered = np.sort(pixels, axis=0)
    n = len(ordered)
    return ((ordered[(n - 1) // 2].astype(np.uint16) + ordered[n // 2]) // 2).astype(np.uint8)
