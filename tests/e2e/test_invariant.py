"""Every task ends with one prediction of the current model, whatever the order of events and faults.

Seeded random schedules against a real Label Studio, the real API, two Celery workers and beat, over a
private Redis with an append-only file: imports (some with annotations, some unreadable), annotations
created, updated, skipped and deleted (one at a time and in bulk), tasks deleted, Start training, label
config changes, Retrieve predictions, opened tasks; and faults: workers killed with SIGKILL, Label Studio
refusing connections or answering 503 to the workers, Redis killed and restarted, 10% of webhooks lost
and 10% delivered twice. When the events stop, the backend must reach the invariant on its own (the
periodic sweep included), and a failure prints the seed and the schedule.

Stand-ins: only the two fault proxies of tests/faults.py, which wrap the real Label Studio and the real
API. `INTERLEAVING_SCHEDULES` (default 2) and `INTERLEAVING_SEED` (default 1) choose the schedules.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.label_studio import LabelStudioServer
from tests.e2e.scenario import Scenario, Stack, converge, deployment

pytestmark = pytest.mark.e2e

FIRST = int(os.environ.get("INTERLEAVING_SEED", "1"))
SEEDS = range(FIRST, FIRST + int(os.environ.get("INTERLEAVING_SCHEDULES", "2")))


@pytest.fixture(scope="module")
def stack(label_studio: LabelStudioServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with deployment(label_studio, tmp_path_factory.mktemp("interleaving"), FIRST, drop=0.1, twice=0.1) as deployed:
        yield deployed


@pytest.mark.parametrize("seed", SEEDS)
def test_every_task_ends_with_exactly_one_prediction_of_the_current_model(stack: Stack, seed: int, tmp_path: Path):
    stack.new_project(f"interleaving seed {seed}")
    scenario = Scenario(stack, seed)
    scenario.run(events=40)
    check, seconds = converge(stack, timeout=300)
    report = f"seed {seed} (INTERLEAVING_SEED={seed} INTERLEAVING_SCHEDULES=1 to replay): {check.summary()}"
    print(
        f"{report}; {seconds:.0f} s after the events; events {dict(scenario.done)}; {dict(stack.relay.counts)}; "
        f"Label Studio locked, tried again: {stack.ls.locked_retries}"
    )
    assert check.ok, report + "\nschedule:\n" + "\n".join(stack.log) + "\n" + stack.logs()
