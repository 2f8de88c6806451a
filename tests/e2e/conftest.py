"""Fixtures for end-to-end tests that drive a real Label Studio 1.23.2.

Label Studio is installed into its own virtualenv on first use (``$LABEL_STUDIO_VENV`` or
``<repo>/.venv-label-studio``; minutes on a fresh machine) and started once per test session. Nothing is
skipped: if it cannot be installed or started, every test that uses it errors with the log tail.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import DATA

from .label_studio import LabelStudioServer


def plankton_data_dir() -> Path:
    """The shared data folder, found as the rest of the suite finds it (tests/helpers.py)."""
    return DATA


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data folder (``flowcam/crops/*.tif``, ``label_config.xml``...)."""
    path = plankton_data_dir()
    if not (path / "label_config.xml").is_file():
        raise FileNotFoundError(f"shared data not found at {path} (set PLANKTON_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def label_config(data_dir: Path) -> str:
    """The real project's labelling configuration."""
    return (data_dir / "label_config.xml").read_text()


@pytest.fixture(scope="session")
def label_studio(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    """A started Label Studio whose ``LOCAL_FILES_DOCUMENT_ROOT`` is the shared data folder.

    Tasks reference images as ``/data/local-files/?d=flowcam/crops/<file>``; ``import_tasks`` adds the
    Local Files storage Label Studio needs to serve them. The log stays in pytest's temporary directory.
    """
    log_path = tmp_path_factory.mktemp("label-studio-log") / "label-studio.log"
    server = LabelStudioServer(data_dir, log_path=log_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
