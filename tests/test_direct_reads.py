"""Label Studio files read where they lie: `/data/local-files/?d=...` under LOCAL_FILES_DOCUMENT_ROOT and
`/data/upload/...` under LABEL_STUDIO_BASE_DATA_DIR/media, as Label Studio itself maps them; anything not
there goes to Label Studio over HTTP (a stand-in server here that records every request); nothing outside
the roots is ever read."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.settings import Settings
from tests.helpers import MeanColourEmbedder, MemoryContentCache, png_bytes, synthetic_particle
from tests.servers import Server, respond, running, settings
from worker import images
from worker.images import ImageError, ImageFetcher
from worker.pipeline import EmbeddingPipeline

KEY = "secret-key-123"


@dataclass
class Layout:
    root: Path  # LOCAL_FILES_DOCUMENT_ROOT
    base: Path  # LABEL_STUDIO_BASE_DATA_DIR
    ls: Server

    def fetcher(self, **changes) -> ImageFetcher:
        values = {"label_studio_url": self.ls.url, "label_studio_api_key": KEY,
                  "local_files_document_root": str(self.root),
                  "label_studio_base_data_dir": str(self.base)}  # fmt: skip
        return ImageFetcher(settings(**{**values, **changes}))

    def asked(self) -> list[str]:
        return [path for _, path, _ in self.ls.requests]


@pytest.fixture(autouse=True, params=["by handle", "by realpath"])
def resolution(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways a path is resolved: an O_PATH handle and /proc (Linux), os.path.realpath (elsewhere)."""
    if request.param == "by realpath":
        monkeypatch.setattr(images, "_BY_HANDLE", False)
    elif not images._BY_HANDLE:
        pytest.skip("no O_PATH or /proc here")


@pytest.fixture
def layout(tmp_path: Path) -> Iterator[Layout]:
    root, base, outside = tmp_path / "files", tmp_path / "ls-data", tmp_path / "outside"
    (root / "flowcam").mkdir(parents=True)
    (root / "flowcam" / "a.png").write_bytes(b"local bytes")
    (root / "flowcam" / "a b.png").write_bytes(b"local spaced")
    (base / "media" / "upload" / "3").mkdir(parents=True)
    (base / "media" / "upload" / "3" / "x.png").write_bytes(b"uploaded bytes")
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"SECRET")
    (root / "link.png").symlink_to(outside / "secret.png")  # a symbolic link out of the root
    (root / "dirlink").symlink_to(outside)
    (root / "alias.png").symlink_to(root / "flowcam" / "a.png")  # a link that stays inside
    (base / "media" / "upload" / "3" / "out.png").symlink_to(outside / "secret.png")
    with running() as ls:
        ls.routes["/data/local-files/"] = respond(b"from label studio")
        ls.routes["/data/upload/3/missing.png"] = respond(b"uploaded over http")
        yield Layout(root, base, ls)


@pytest.mark.parametrize(
    "ref",
    ["/data/local-files/?d=flowcam/a.png", "data/local-files/?d=flowcam%2Fa.png", "/data/local-files/?d=/flowcam/a.png",
     "{ls}/data/local-files/?d=flowcam/./a.png", "/data/local-files/?d=flowcam/x/../a.png",
     "/data/local-files/?d=alias.png"],
)  # fmt: skip
def test_local_files_are_read_from_the_document_root(layout: Layout, ref: str):
    assert layout.fetcher().fetch(ref.format(ls=layout.ls.url)) == b"local bytes"
    assert layout.asked() == []


def test_a_file_name_with_a_space(layout: Layout):
    assert layout.fetcher().fetch("/data/local-files/?d=flowcam/a%20b.png") == b"local spaced"
    assert layout.fetcher().fetch("/data/local-files/?d=flowcam/a+b.png") == b"local spaced"


def test_uploads_are_read_from_label_studios_media_folder(layout: Layout):
    assert layout.fetcher().fetch("/data/upload/3/x.png") == b"uploaded bytes"
    assert layout.fetcher().fetch(f"{layout.ls.url}/data/upload/3/x.png") == b"uploaded bytes"
    assert layout.asked() == []


def test_direct_reads_need_no_label_studio_url(layout: Layout):
    assert layout.fetcher(label_studio_url="").fetch("/data/local-files/?d=flowcam/a.png") == b"local bytes"


def test_a_missing_file_falls_back_to_http_with_the_key(layout: Layout):
    fetcher = layout.fetcher()
    assert fetcher.fetch("/data/local-files/?d=flowcam/missing.png") == b"from label studio"
    assert fetcher.fetch("/data/upload/3/missing.png") == b"uploaded over http"
    assert layout.asked() == ["/data/local-files/?d=flowcam/missing.png", "/data/upload/3/missing.png"]
    assert {h.get("Authorization") for _, _, h in layout.ls.requests} == {f"Token {KEY}"}


def test_a_root_this_worker_cannot_see_falls_back_to_http(layout: Layout, tmp_path: Path):
    fetcher = layout.fetcher(local_files_document_root=str(tmp_path / "not-mounted"), label_studio_base_data_dir="")
    assert fetcher.fetch("/data/local-files/?d=flowcam/a.png") == b"from label studio"
    assert fetcher.fetch("/data/upload/3/missing.png") == b"uploaded over http"


@pytest.mark.parametrize(
    "ref",
    ["/data/local-files/?d=../outside/secret.png", "/data/local-files/?d=flowcam/../../outside/secret.png",
     "/data/local-files/?d=..", "/data/upload/3/../../../../outside/secret.png", "/data/upload/%2e%2e/%2e%2e/x.png"],
)  # fmt: skip
def test_traversal_is_refused_before_any_read_or_request(layout: Layout, ref: str):
    with pytest.raises(ImageError, match="escapes|not a Label Studio image path") as exc:
        layout.fetcher().fetch(ref)
    assert not exc.value.transient and layout.asked() == []


@pytest.mark.parametrize("ref", ["/data/local-files/?d=link.png", "/data/local-files/?d=dirlink/secret.png",
                                 "/data/upload/3/out.png"])  # fmt: skip
def test_a_symlink_out_of_the_root_is_never_read_from_disk(layout: Layout, ref: str):
    """Label Studio is asked instead (its own checks decide); without LABEL_STUDIO_URL the task fails."""
    layout.ls.routes.clear()  # Label Studio answers 404 here
    with pytest.raises(ImageError, match="answered HTTP 404"):
        layout.fetcher().fetch(ref)
    assert len(layout.asked()) == 1
    with pytest.raises(
        ImageError, match="a link out of the folder it names, or a file with hard links: not read"
    ) as exc:
        layout.fetcher(label_studio_url="").fetch(ref)
    assert "SECRET" not in str(exc.value) and not exc.value.transient


def test_a_hard_link_in_the_root_is_never_read_from_disk(layout: Layout):
    """A hard link inside the root to a file outside it has no path that leads out: any file with more than
    one link is left to Label Studio over HTTP, and without LABEL_STUDIO_URL fails its task."""
    os.link(layout.root.parent / "outside" / "secret.png", layout.root / "flowcam" / "hard.png")
    layout.ls.routes.clear()  # Label Studio answers 404 here
    with pytest.raises(ImageError, match="answered HTTP 404") as exc:
        layout.fetcher().fetch("/data/local-files/?d=flowcam/hard.png")
    assert layout.asked() == ["/data/local-files/?d=flowcam/hard.png"] and "SECRET" not in str(exc.value)
    assert layout.fetcher().read_from_disk("/data/local-files/?d=flowcam/hard.png") is None
    with pytest.raises(ImageError, match="a file with hard links: not read"):
        layout.fetcher(label_studio_url="").fetch("/data/local-files/?d=flowcam/hard.png")
    assert layout.fetcher().fetch("/data/local-files/?d=flowcam/a.png") == b"local bytes"  # one link: read


def test_a_read_from_disk_never_asks_label_studio(layout: Layout):
    """What the pipeline's read threads call: the file, or None where `fetch` would go to Label Studio."""
    fetcher = layout.fetcher()
    assert fetcher.read_from_disk("/data/local-files/?d=flowcam/a.png") == b"local bytes"
    assert fetcher.read_from_disk(f"{layout.ls.url}/data/upload/3/x.png") == b"uploaded bytes"
    for ref in ["/data/local-files/?d=flowcam/missing.png", "/data/upload/3/missing.png",
                "/data/local-files/?d=link.png", "/data/upload/3/out.png", "/tasks/3/presign/?fileuri=czM6Ly9i",
                "http://elsewhere.example/data/upload/3/x.png"]:  # fmt: skip
        assert fetcher.read_from_disk(ref) is None, ref
    with pytest.raises(ImageError, match="escapes"):
        fetcher.read_from_disk("/data/local-files/?d=../outside/secret.png")
    assert layout.fetcher(local_files_document_root="").read_from_disk("/data/local-files/?d=flowcam/a.png") is None
    assert layout.asked() == []


def test_a_fifo_a_folder_and_a_large_file_fail_without_blocking(layout: Layout):
    os.mkfifo(layout.root / "fifo.png")
    (layout.root / "big.png").write_bytes(b"x" * 2000)
    fetcher = layout.fetcher(image_max_bytes=1000)
    with pytest.raises(ImageError, match="fifo.png is not a regular file"):
        fetcher.fetch("/data/local-files/?d=fifo.png")
    with pytest.raises(ImageError, match="flowcam is not a regular file"):
        fetcher.fetch("/data/local-files/?d=flowcam")
    with pytest.raises(ImageError, match=r"big.png is 2000 bytes, over the 1000-byte limit \(IMAGE_MAX_BYTES\)"):
        fetcher.fetch("/data/local-files/?d=big.png")
    assert layout.asked() == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_a_file_this_worker_may_not_read_falls_back_to_http(layout: Layout):
    private = layout.root / "private.png"
    private.write_bytes(b"private")
    private.chmod(0)
    assert layout.fetcher().fetch("/data/local-files/?d=private.png") == b"from label studio"


def test_settings_use_label_studios_own_variable_names(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LOCAL_FILES_DOCUMENT_ROOT", "/srv/files")
    monkeypatch.setenv("LABEL_STUDIO_BASE_DATA_DIR", "/srv/label-studio")
    monkeypatch.setenv("IMAGE_HOSTS", "images.lab:8080,minio")
    monkeypatch.setenv("IMAGE_MAX_SIDE", "5000")
    monkeypatch.setenv("IMAGE_MAX_ASPECT", "40")
    s = Settings.from_env()
    assert (s.local_files_document_root, s.label_studio_base_data_dir) == ("/srv/files", "/srv/label-studio")
    assert (s.image_hosts, s.image_max_side, s.image_max_aspect) == ("images.lab:8080,minio", 5000, 40.0)
    monkeypatch.delenv("LOCAL_FILES_DOCUMENT_ROOT")
    monkeypatch.setenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", "/srv/prefixed")
    assert Settings.from_env().local_files_document_root == "/srv/prefixed"


@pytest.mark.parametrize("read_workers", [1, 3])
def test_a_chunk_reads_local_files_in_read_threads_and_what_fails_fails_alone(layout: Layout, read_workers: int):
    """Local files are read by the pipeline's read threads (READ_WORKERS, one by default), in groups; other
    references, and a local file not on this disk, go to the download threads (a read thread never waits on
    Label Studio); a task whose read or decode fails fails alone in its group."""
    for i in range(40):
        (layout.root / f"p{i}.png").write_bytes(png_bytes(synthetic_particle("round", i, size=20 + i % 9)))
    (layout.root / "corrupt.png").write_bytes(b"not an image")
    layout.ls.routes["/data/local-files/"] = respond(png_bytes(synthetic_particle("rod", 99)))
    (layout.base / "media" / "upload" / "3" / "up.png").write_bytes(png_bytes(synthetic_particle("rod", 7)))
    refs = {i: f"/data/local-files/?d=p{i}.png" for i in range(40)}
    refs |= {40: "/data/local-files/?d=corrupt.png", 41: "/data/local-files/?d=missing.png",
             42: f"{layout.ls.url}/data/upload/3/up.png", 43: f"{layout.ls.url}/not-a-file-path.png"}  # fmt: skip
    tasks = [{"id": i, "data": {"image": ref}} for i, ref in refs.items()] + [{"id": 44, "data": {}}]
    fetcher = layout.fetcher()
    calls: dict[tuple[str, str], str] = {}  # (method, ref) -> the thread that called it
    read, fetch = fetcher.read_from_disk, fetcher.fetch

    def recorded_read(ref: str) -> bytes | None:
        calls["read", ref] = threading.current_thread().name
        if ref == refs[7]:
            raise RuntimeError("a bug in one task")
        return read(ref)

    def recorded_fetch(ref: str) -> bytes:
        calls["fetch", ref] = threading.current_thread().name
        return fetch(ref)

    fetcher.read_from_disk, fetcher.fetch = recorded_read, recorded_fetch  # type: ignore[method-assign]
    model, cache = MeanColourEmbedder(32), MemoryContentCache()
    pipeline = EmbeddingPipeline(model, fetcher, cache, 4, 10_000_000, read_workers=read_workers)  # type: ignore[arg-type]
    try:
        out = pipeline.run(tasks, "image")
    finally:
        pipeline.close()

    assert set(out.features) == set(range(40)) - {7} | {41, 42}
    assert set(out.errors) == {7, 40, 43, 44}
    assert out.errors[7] == "unexpected error: RuntimeError: a bug in one task"
    assert "cannot decode image" in out.errors[40]
    assert "not a Label Studio image path" in out.errors[43] and "has no 'image'" in out.errors[44]
    assert layout.asked() == ["/data/local-files/?d=missing.png"]
    local = {("read", refs[i]) for i in range(43)}
    assert {k for k in calls if k[0] == "read"} == local
    assert {calls[k] for k in local} <= {f"read_{i}" for i in range(read_workers)}, calls
    assert read_workers > 1 or {calls[k] for k in local} == {"read_0"}
    assert {k for k in calls if k[0] == "fetch"} == {("fetch", refs[41]), ("fetch", refs[43])}
    assert calls["fetch", refs[41]].startswith("download") and calls["fetch", refs[43]].startswith("download")
