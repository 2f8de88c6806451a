"""Getting a task's image: fetch the bytes (http, Label Studio paths, S3), decode, and preprocess.

Every failure is an `ImageError` whose message says what went wrong for that one task; the rest of a
batch goes on.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

import numpy as np
import requests
from PIL import Image, ImageOps

from common.settings import Settings
from worker.http_client import FetchError, KeepAliveClient

Image.MAX_IMAGE_PIXELS = None  # we check the pixel count ourselves, with a clear error


class ImageError(Exception):
    """One task's image cannot be used. The message is shown in the job status and the log."""


def image_reference(task: Mapping[str, Any], image_key: str) -> str:
    data = task.get("data")
    value = data.get(image_key) if isinstance(data, Mapping) else None
    if not isinstance(value, str) or not value.strip():
        raise ImageError(f"task {task.get('id')} has no '{image_key}' in its data")
    return value.strip()


def _is_jwt(token: str) -> bool:
    parts = token.split(".")
    return len(parts) == 3 and all(parts)


class LabelStudioAuth:
    """Headers for Label Studio's own file URLs. A personal access token (a JWT refresh token) is not
    accepted there: it is exchanged at /api/token/refresh/ for a short-lived access token first."""

    def __init__(self, base_url: str, api_key: str, session: requests.Session, timeout: float) -> None:
        self.base_url = base_url
        self.api_key = api_key
        self.session = session
        self.timeout = timeout
        self._access: str | None = None
        self._expires = 0.0
        self._lock = threading.Lock()

    def headers(self, refresh: bool = False) -> dict[str, str]:
        if not self.api_key:
            return {}
        if not _is_jwt(self.api_key):
            return {"Authorization": f"Token {self.api_key}"}
        with self._lock:
            if refresh or self._access is None or time.time() > self._expires:
                try:
                    resp = self.session.post(
                        f"{self.base_url}/api/token/refresh/", json={"refresh": self.api_key}, timeout=self.timeout
                    )
                except requests.RequestException as exc:
                    raise ImageError(f"cannot reach Label Studio to exchange LABEL_STUDIO_API_KEY: {exc}") from None
                if resp.status_code != 200:
                    raise ImageError(f"Label Studio refused LABEL_STUDIO_API_KEY ({resp.status_code})")
                self._access = resp.json()["access"]
                self._expires = time.time() + _jwt_lifetime(self._access) - 30
            return {"Authorization": f"Bearer {self._access}"}


def _jwt_lifetime(token: str) -> float:
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return max(0.0, float(claims["exp"]) - time.time())
    except (ValueError, KeyError, IndexError):
        return 60.0


class ImageFetcher:
    """Thread-safe: one per worker process, used from the download threads."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.http = KeepAliveClient(settings.download_timeout, settings.image_max_bytes)
        self.ls_auth = LabelStudioAuth(
            settings.label_studio_url, settings.label_studio_api_key, requests.Session(), settings.download_timeout
        )
        self._s3 = None

    def fetch(self, ref: str) -> bytes:
        if ref.startswith("s3://"):
            return self._fetch_s3(ref)
        if ref.startswith("/data/") or ref.startswith("data/"):
            if not self.settings.label_studio_url:
                raise ImageError(f"{ref} is a Label Studio path but LABEL_STUDIO_URL is not set")
            url = f"{self.settings.label_studio_url}/{ref.lstrip('/')}"
            return self._fetch_http(url, label_studio=True)
        scheme = urlparse(ref).scheme
        if scheme in ("http", "https"):
            is_ls = bool(self.settings.label_studio_url) and ref.startswith(self.settings.label_studio_url + "/")
            return self._fetch_http(ref, label_studio=is_ls)
        raise ImageError(f"unsupported image reference {ref[:200]!r} (expected http(s)://, /data/... or s3://)")

    def _fetch_http(self, url: str, label_studio: bool) -> bytes:
        try:
            resp = self.http.get(url, self.ls_auth.headers() if label_studio else {})
            if resp.status == 401 and label_studio and _is_jwt(self.settings.label_studio_api_key):
                resp = self.http.get(url, self.ls_auth.headers(refresh=True))
        except FetchError as exc:
            raise ImageError(str(exc)) from None
        if resp.status != 200:
            raise ImageError(f"GET {url} answered HTTP {resp.status}")
        return resp.body

    def _fetch_s3(self, ref: str) -> bytes:
        parsed = urlparse(ref)
        bucket, key = parsed.netloc, parsed.path.lstrip("/")
        if not bucket or not key:
            raise ImageError(f"{ref} is not s3://bucket/key")
        if self._s3 is None:
            import boto3

            self._s3 = boto3.client("s3", endpoint_url=self.settings.s3_endpoint_url or None)
        try:
            obj = self._s3.get_object(Bucket=bucket, Key=key)
        except Exception as exc:
            raise ImageError(f"cannot read {ref}: {exc}") from None
        if obj.get("ContentLength", 0) > self.settings.image_max_bytes:
            raise ImageError(f"{ref} is over the {self.settings.image_max_bytes}-byte limit (IMAGE_MAX_BYTES)")
        return obj["Body"].read()


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Any Pillow-readable image as 8-bit RGB. Greyscale deeper than 8 bits (FlowCam and cytometer
    TIFFs) is scaled by its own maximum to 0..1, then replicated to three channels."""
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        if width * height > max_pixels:
            raise ImageError(f"image is {width}x{height}, over the {max_pixels}-pixel limit (IMAGE_MAX_PIXELS)")
        img.load()
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"cannot decode image: {type(exc).__name__}: {exc}") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        peak = float(arr.max()) if arr.size else 0.0
        scaled = arr / peak if peak > 0 else np.zeros_like(arr)
        grey = np.clip(scaled * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey] * 3, axis=-1), "RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def to_model_input(img: Image.Image, size: int) -> np.ndarray:
    """Pad to a square with the image's own border colour (aspect ratio kept), resize to `size`.

    Returns uint8 HxWx3; scaling to float and normalising happen on the model's device.
    """
    width, height = img.size
    side = max(width, height)
    if width != height:
        border = np.concatenate(
            [np.asarray(img)[[0, -1], :, :].reshape(-1, 3), np.asarray(img)[:, [0, -1], :].reshape(-1, 3)]
        )
        fill = tuple(int(v) for v in np.median(border, axis=0))
        img = ImageOps.pad(img, (side, side), color=fill, centering=(0.5, 0.5))
    if side != size:
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    return np.asarray(img, dtype=np.uint8)
