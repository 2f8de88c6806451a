"""Headless Chromium for the browser tests: Debian's package, driven by Playwright (never Playwright's own
browser download, which this network blocks). Found on PATH (or `$CHROMIUM`), else installed with apt-get
when the tests run as root (CI does); otherwise the test fails and says what to do."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

# What this machine needs (no sandbox as root; no background connections, which its closed network refuses).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
NAMES = ("chromium", "chromium-browser", "google-chrome")


def _found() -> str | None:
    wanted = os.environ.get("CHROMIUM")
    if wanted:
        if not (Path(wanted).is_file() and os.access(wanted, os.X_OK)):
            pytest.fail(f"CHROMIUM={wanted} is not an executable file")
        return wanted
    return next((path for name in NAMES if (path := shutil.which(name))), None)


def _apt_install() -> str:
    """apt-get update and install Debian's chromium; returns what went wrong, or ''."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"]):  # fmt: skip
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{' '.join(command)}: {exc}"
        if done.returncode != 0:
            return f"{' '.join(command)} exited with {done.returncode}: {(done.stderr or done.stdout)[-800:]}"
    return ""


def chromium_path() -> str:
    """Debian's Chromium, installed first if absent and allowed; else the test fails, saying why."""
    path = _found()
    if path:
        return path
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.fail("the browser tests need headless Chromium: install Debian's package "
                    "(`sudo apt-get install chromium`) or set CHROMIUM=/path/to/chromium")  # fmt: skip
    problem = _apt_install()
    path = _found()
    if not path:
        pytest.fail(f"the browser tests need headless Chromium, and installing Debian's chromium failed: {problem}")
    return path


def launch(playwright):
    """A headless Chromium from Debian's package, through Playwright."""
    return playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)


def sync_playwright():
    try:
        from playwright.sync_api import sync_playwright as start
    except ImportError:
        pytest.fail("the browser tests drive Chromium with Playwright: `pip install playwright` (the dev extra; "
                    "never `playwright install`: the browser is Debian's chromium)")  # fmt: skip
    return start()
