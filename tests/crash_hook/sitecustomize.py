"""TEST-ONLY: a worker process started with this folder on its PYTHONPATH aborts (SIGABRT) when it opens an
image that carries MARKER, as if decoding that image crashed it; no real image is known to crash the pinned
Pillow, libtiff and libwebp. Nothing in the backend loads this file: only tests/test_crashing_chunks.py, by
putting this folder on the PYTHONPATH of the worker it starts; tests/ is not in the Docker images
(.dockerignore). Each abort is written to $PLANKTON_TEST_CRASH_LOG first, so the test can count them."""

import os

from PIL import Image

MARKER = b"plankton-test: abort the process that opens this image"
_open = Image.open


def _open_or_abort(fp, *args, **kwargs):  # type: ignore[no-untyped-def]
    data = fp.getvalue() if hasattr(fp, "getvalue") else b""
    if MARKER in data:
        with open(os.environ["PLANKTON_TEST_CRASH_LOG"], "a") as log:
            log.write(f"{os.getpid()}\n")
        os.abort()
    return _open(fp, *args, **kwargs)


Image.open = _open_or_abort
