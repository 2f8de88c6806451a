"""Chaos: a real Label Studio, 1,000 shared particles, annotators at work during the import, and every fault
the backend must survive, then the time until every task is right again.

During an import of 1,000 particles (10 batches through Label Studio's API, a few seconds apart), with
annotations made at random moments from the first batch on:
- a worker is killed (SIGKILL, the whole process group) twice, and restarted 10 s later;
- Label Studio refuses the workers' connections for 60 s while predictions are being written back;
- Redis is killed and restarted on its append-only file once;
- 10% of Label Studio's webhooks are lost (and, with --twice, some delivered twice).
Then it waits for the backend to repair everything on its own (the periodic sweep, SYNC_INTERVAL_SECONDS,
60 here) and prints: tasks lacking a current prediction, duplicate predictions, annotations not learned,
predictions not made by the current version's model, tasks still counted as queued, and the time until
all were 0.

    .venv/bin/python bench/chaos.py [--tasks 1000] [--seed 7]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.label_studio import LabelStudioServer  # noqa: E402
from tests.e2e.scenario import Scenario, check_invariant, converge, deployment  # noqa: E402
from tests.helpers import DATA  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--drop", type=float, default=0.10, help="share of webhooks lost")
    parser.add_argument("--twice", type=float, default=0.0, help="share of webhooks delivered twice")
    parser.add_argument("--outage", type=float, default=60.0, help="seconds Label Studio refuses the workers")
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-chaos-"))
    print(f"logs in {tmp}", flush=True)
    with LabelStudioServer(DATA, log_path=tmp / "label-studio.log") as ls, deployment(
        ls, tmp, args.seed, drop=args.drop, twice=args.twice, SYNC_INTERVAL_SECONDS="60", CHUNK_SIZE="128",
        REFIT_EVERY="5", REFIT_DELAY_SECONDS="10",
    ) as stack:  # fmt: skip
        stack.new_project(f"chaos seed {args.seed}")
        scenario = Scenario(stack, args.seed)
        rng = random.Random(args.seed)
        per_batch = args.tasks // args.batches
        started = time.monotonic()
        annotating = threading.Event()

        def annotators() -> None:
            while not annotating.is_set():
                time.sleep(rng.uniform(0.5, 3.0))
                if scenario.tasks and not annotating.is_set():
                    scenario.annotate()

        people = threading.Thread(target=annotators, daemon=True)
        for batch in range(args.batches):
            scenario.import_tasks(per_batch)
            if batch == 0:
                people.start()
            if batch == 2:
                scenario.kill_worker(10)
            if batch == 4:
                scenario.later(3, stack.ls_proxy.down)  # while the first batches' predictions are written
                scenario.later(3 + args.outage, stack.ls_proxy.up)
                scenario.note(f"outage: Label Studio refusing the workers' connections for {args.outage:.0f} s")
            if batch == 6:
                scenario.restart_redis()
            if batch == 8:
                scenario.kill_worker(10)
            time.sleep(rng.uniform(2, 4))
        annotating.set()
        people.join()
        events_took = time.monotonic() - started
        for timer in scenario.timers:
            timer.join()
        scenario.heal()
        at_end = check_invariant(stack)
        check, waited = converge(stack, args.timeout)
        print("\nwhat happened:")
        for line in stack.log:
            print(f"  {line}")
        print(f"\nwebhooks: {dict(stack.relay.counts)}")
        print(f"events and faults took {time.monotonic() - started - waited:.0f} s (imports {events_took:.0f} s)")
        print(f"right after the events: {at_end.summary()}")
        print("\nmeasure                                        value")
        print("-" * 60)
        print(f"tasks                                          {check.tasks}")
        print(f"tasks lacking a current prediction             {len(check.lacking)}")
        print(f"duplicate predictions                          {len(check.duplicates)}")
        print(f"annotations not learned                        {len(check.unlearned)}")
        print(f"predictions not from the version's model       {len(check.wrong_model)}")
        print(f"failures without a reason                      {len(check.unexplained)}")
        print(f"tasks still counted as queued                  {check.queued}")
        verdict = f"{waited:.0f} s after the faults healed" if check.ok else f"NOT within {args.timeout:.0f} s"
        print(f"time until all were 0                          {verdict}")
        print(f"current version                                {check.version}")
        return 0 if check.ok else 1


if __name__ == "__main__":
    sys.exit(main())
