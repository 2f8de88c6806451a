"""Which image collection a task's image belongs to: the unit of a per-bucket model."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

PER_PROJECT = "project"
PER_BUCKET = "bucket"
SCOPES = (PER_PROJECT, PER_BUCKET)


def collection_of(ref: str) -> str:
    """`s3://bucket/...` → `s3://bucket` (likewise gs://, azure-blob://); an http(s) URL → its host and
    first path segment; Label Studio uploads → the project's upload folder; local files → top folder."""
    if not ref:
        return ""
    parsed = urlparse(ref)
    if parsed.scheme in ("s3", "gs", "azure-blob"):
        return f"{parsed.scheme}://{parsed.netloc}"
    path = parsed.path.strip("/").split("/")
    if parsed.path.startswith("/data/local-files") or ref.startswith("data/local-files"):
        folder = parse_qs(parsed.query).get("d", [""])[0].strip("/").split("/")[0]
        return f"local-files:{folder}"
    if parsed.path.startswith("/data/upload/") and len(path) >= 3:
        return f"upload:{path[2]}"
    if parsed.scheme in ("http", "https"):
        return f"{parsed.scheme}://{parsed.netloc}/{path[0] if path and len(path) > 1 else ''}".rstrip("/")
    return ""
