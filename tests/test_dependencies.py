"""The locks in requirements/ against pyproject.toml, the code's imports and this venv.

Every environment installs from a lock (README "Dependencies"): these tests fail when pyproject.toml changes
without `make lock`, when code imports a package it does not declare, when a lock loses its exact versions or
hashes, and when the venv running the tests was not installed from the lock.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.e2e.label_studio import LABEL_STUDIO_LOCK, LABEL_STUDIO_VERSION
from tests.helpers import REPO

REQUIREMENTS = REPO / "requirements"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
OURSELVES = "plankton-ml-backend (pyproject.toml)"


@dataclass
class Pin:
    name: str
    version: str
    marker: Marker | None
    hashes: list[str] = field(default_factory=list)
    via: list[str] = field(default_factory=list)

    def applies(self) -> bool:
        return self.marker is None or self.marker.evaluate()


def read_lock(path: Path) -> list[Pin]:
    """The pins of a lock written by `uv pip compile --generate-hashes` (continuations, hashes, `# via`)."""
    pins: list[Pin] = []
    lines = path.read_text().splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        if not line or line.startswith("#"):
            continue
        if line.startswith(" "):
            text = line.strip()
            if text.startswith("--hash="):
                pins[-1].hashes.append(text.removeprefix("--hash=").rstrip(" \\"))
            elif text.startswith("# via"):
                rest = text.removeprefix("# via").strip()
                if rest:
                    pins[-1].via.append(rest)
                while index < len(lines) and lines[index].strip().startswith("#   "):
                    pins[-1].via.append(lines[index].strip().removeprefix("#").strip())
                    index += 1
            continue
        requirement = Requirement(line.rstrip(" \\"))
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"{path.name}: {line!r} is not an exact pin"
        pins.append(Pin(canonicalize_name(requirement.name), specifier.version, requirement.marker))
    return pins


def declared(*extras: str) -> list[Requirement]:
    """pyproject.toml's base dependencies and those of the given extras."""
    texts = list(PYPROJECT["project"]["dependencies"])
    for extra in extras:
        texts += PYPROJECT["project"]["optional-dependencies"][extra]
    return [Requirement(text) for text in texts]


def build_requirements() -> list[Requirement]:
    return [Requirement(line) for line in _in_file(REQUIREMENTS / "build.in")]


def _in_file(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


# Which lock holds which environment, and what it must pin as its own direct requirements.
LOCKS = {
    "dev.txt": ("worker", "run", "dev"),  # the project's .venv (make install)
    "api.txt": (),  # Dockerfile.api
    "worker.txt": ("worker",),  # Dockerfile.worker, torch and torchvision left to its base image
}
LEFT_TO_THE_WORKER_IMAGE = {"torch", "torchvision"}
NEVER = Marker("sys_platform == 'never'")  # how requirements/worker-image.in takes a package out


def test_every_lock_pins_exact_versions_with_hashes():
    for path in [*(REQUIREMENTS / name for name in LOCKS), LABEL_STUDIO_LOCK]:
        pins = read_lock(path)
        assert len(pins) > 10, path
        unhashed = [pin.name for pin in pins if not pin.hashes]
        assert not unhashed, f"{path.name}: no hashes for {unhashed}"
        assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", digest) for pin in pins for digest in pin.hashes)


@pytest.mark.parametrize("lock_name", sorted(LOCKS))
def test_a_lock_pins_exactly_what_pyproject_declares(lock_name: str):
    """A dependency added, removed or tightened in pyproject.toml without `make lock` fails here."""
    pins = {pin.name: pin for pin in read_lock(REQUIREMENTS / lock_name)}
    wanted = declared(*LOCKS[lock_name]) + build_requirements()
    if lock_name == "worker.txt":
        wanted = [r for r in wanted if canonicalize_name(r.name) not in LEFT_TO_THE_WORKER_IMAGE]
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is declared but not in {lock_name}: run `make lock`"
        assert requirement.specifier.contains(pins[name].version, prereleases=True), (
            f"{lock_name} pins {name}=={pins[name].version}, which {requirement} does not allow: run `make lock`"
        )
    direct = {
        name
        for name, pin in pins.items()
        if (OURSELVES in pin.via or "-r requirements/build.in" in pin.via) and pin.marker != NEVER
    }
    assert direct == {canonicalize_name(r.name) for r in wanted}, f"{lock_name} was made from another pyproject.toml"


def test_the_images_locks_agree_with_the_venvs():
    """api.txt and worker.txt are made with dev.txt as constraints: a package has one version everywhere."""
    dev = {(pin.name, pin.version) for pin in read_lock(REQUIREMENTS / "dev.txt")}
    for name in ("api.txt", "worker.txt"):
        for pin in read_lock(REQUIREMENTS / name):
            assert (pin.name, pin.version) in dev, f"{name} pins {pin.name}=={pin.version}, which dev.txt does not"


def test_the_worker_image_keeps_its_base_images_torch():
    pins = read_lock(REQUIREMENTS / "worker.txt")
    torch_only = [pin for pin in pins if pin.name in LEFT_TO_THE_WORKER_IMAGE or pin.name.startswith("nvidia-")]
    assert torch_only, "worker.txt should list torch (under a marker that never holds)"
    for pin in torch_only:
        assert pin.marker == NEVER, pin
    dockerfile = (REPO / "Dockerfile.worker").read_text()
    assert "pip install --require-hashes -r requirements/worker.txt" in dockerfile
    assert "PIP_CONSTRAINT=/etc/pip-constraints-base.txt" in dockerfile
    assert "pip install --require-hashes -r requirements/api.txt" in (REPO / "Dockerfile.api").read_text()


def test_holds_and_build_backend_are_kept():
    dev = {pin.name: pin.version for pin in read_lock(REQUIREMENTS / "dev.txt")}
    for line in _in_file(REQUIREMENTS / "holds.in"):
        requirement = Requirement(line)
        assert requirement.specifier.contains(dev[canonicalize_name(requirement.name)]), requirement
    assert [line.split(";")[0].strip() for line in _in_file(REQUIREMENTS / "worker-image.in")] == sorted(
        LEFT_TO_THE_WORKER_IMAGE
    )
    assert [str(r) for r in build_requirements()] == PYPROJECT["build-system"]["requires"]


def test_label_studio_is_locked_with_the_sentry_sdk_it_starts_with():
    """Label Studio 1.23.2 does not start with sentry-sdk 3 (issue 23): its lock keeps the 2.x series."""
    pins = {pin.name: pin for pin in read_lock(LABEL_STUDIO_LOCK)}
    assert pins["label-studio"].version == LABEL_STUDIO_VERSION
    assert Version(pins["sentry-sdk"].version) < Version("3")
    for line in _in_file(REQUIREMENTS / "label-studio.in"):
        requirement = Requirement(line)
        assert requirement.specifier.contains(pins[canonicalize_name(requirement.name)].version), requirement


def test_this_venv_was_installed_from_the_lock():
    """`make install` installs dev.txt exactly (a torch from another index may carry a local tag, `+cpu`)."""
    wrong = {}
    for pin in read_lock(REQUIREMENTS / "dev.txt"):
        if not pin.applies():
            continue
        try:
            installed = importlib.metadata.version(pin.name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed is None or Version(installed).public != Version(pin.version).public:
            wrong[pin.name] = (pin.version, installed)
    assert not wrong, f"installed versions differ from requirements/dev.txt (locked, installed): {wrong}"


# --- every import is declared ----------------------------------------------------------------------------------

# Our packages, and the scripts that tests and benchmarks import by putting their folder on sys.path.
FIRST_PARTY = {"api", "common", "worker", "tests", "bench", "scripts"} | {
    path.stem for folder in ("scripts", "bench") for path in (REPO / folder).glob("*.py")
}
# Which of pyproject's dependency groups each folder may import from: the API never gets the worker's packages.
IMPORTS_MAY_COME_FROM = {
    "api": (),
    "common": (),
    "worker": ("worker",),
    "scripts": ("worker", "run", "dev"),
    "bench": ("worker", "run", "dev"),
    "tests": ("worker", "run", "dev"),
}


def _top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _third_party_imports(folder: str) -> dict[str, list[str]]:
    """Top-level modules imported under a folder that are neither the standard library nor ours."""
    found: dict[str, list[str]] = {}
    for path in sorted((REPO / folder).rglob("*.py")):
        siblings = {p.stem for p in path.parent.glob("*.py")} | {p.name for p in path.parent.iterdir() if p.is_dir()}
        for name in _top_level_imports(path):
            if name in sys.stdlib_module_names or name in FIRST_PARTY or name in siblings or name == "__future__":
                continue
            found.setdefault(name, []).append(str(path.relative_to(REPO)))
    return found


@pytest.mark.parametrize("folder", sorted(IMPORTS_MAY_COME_FROM))
def test_every_package_the_code_imports_is_declared(folder: str):
    """A package that only arrives through another one (scipy through scikit-learn) may vanish with an upgrade."""
    distributions = importlib.metadata.packages_distributions()
    allowed = {canonicalize_name(r.name) for r in declared(*IMPORTS_MAY_COME_FROM[folder])}
    undeclared = {}
    for module, files in _third_party_imports(folder).items():
        providers = {canonicalize_name(d) for d in distributions.get(module, [])}
        assert providers, f"{module} (imported by {files[0]}) is not installed: declare it and run `make lock`"
        if not providers & allowed:
            undeclared[module] = (sorted(providers), files[:3])
    assert not undeclared, f"{folder}/ imports packages its dependency group does not declare: {undeclared}"


def test_the_import_check_sees_an_undeclared_import(tmp_path: Path):
    """The check above can fail: scipy imported from the API's side is not among the base dependencies."""
    module = tmp_path / "probe.py"
    module.write_text("import scipy.sparse\nfrom flask import Flask\nimport json\n")
    assert _top_level_imports(module) == {"scipy", "flask", "json"}
    base = {canonicalize_name(r.name) for r in declared()}
    providers = {canonicalize_name(d) for d in importlib.metadata.packages_distributions()["scipy"]}
    assert not providers & base


# --- the Makefile --------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_recreates_a_venv_whose_creation_was_cut_short(tmp_path: Path):
    """A Ctrl-C during `python -m venv` leaves a venv without pip; the next `make` starts it over."""
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / ".venv")], check=True)
    (tmp_path / ".venv" / "half-made").write_text("")
    assert not (tmp_path / ".venv" / "bin" / "pip").exists()
    result = subprocess.run(
        ["make", "-C", str(tmp_path), ".venv/bin/pip", f"PY={sys.executable}"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / ".venv" / "bin" / "pip").exists()
    assert not (tmp_path / ".venv" / "half-made").exists()
    pip = subprocess.run([str(tmp_path / ".venv" / "bin" / "pip"), "--version"], capture_output=True, text=True)
    assert pip.returncode == 0 and str(tmp_path / ".venv") in pip.stdout
