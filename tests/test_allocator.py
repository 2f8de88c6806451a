"""The worker keeps freed memory for its next batch (worker/allocator.py): a large block freed and allocated
again is not page-faulted in anew. Checked in fresh processes, with and without it, by counting page faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

PROGRAM = """
import json, resource, sys
import numpy as np
from worker.allocator import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "keep" else False
np.ones(64 << 20, np.uint8)  # the first batch: its pages are faulted in either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    block = np.ones(64 << 20, np.uint8)  # a forward pass's activations, freed after each batch
    del block
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def run(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], cwd=REPO, env={**clean, **env}, capture_output=True,
                         text=True, timeout=60, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_large_blocks_freed_between_batches_are_not_faulted_in_again():
    plain, kept = run("plain"), run("keep")
    assert kept["applied"]
    # At least a fault per 2 MiB (numpy asks for transparent huge pages) of each of the 10 blocks.
    assert plain["faults"] >= 10 * (64 << 20) // (2 << 20), "glibc maps and unmaps a 64 MiB block each time"
    assert kept["faults"] < plain["faults"] / 20


def test_a_user_tuned_malloc_is_left_alone():
    assert not run("keep", MALLOC_TRIM_THRESHOLD_="1000000")["applied"]
