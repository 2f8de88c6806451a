"""Queue and task names shared by the API (which sends) and the workers (which run)."""

INTERACTIVE = "interactive"  # the task an annotator has open: a bulk chunk gives way to it after its batch
CONTROL = "control"  # short work that unblocks others (refits, deliveries, gap fills, splitting an import)
BULK = "bulk"  # chunks of images to embed, and reconciliation
QUEUES = (INTERACTIVE, CONTROL, BULK)  # consumed in this order

INGEST = "plankton.predict_tasks"  # embed a chunk of tasks and predict them
FAN_OUT = "plankton.fan_out"  # split a parked import into chunks
REFIT = "plankton.refit"  # fit and publish a new model version
FILL_GAPS = "plankton.fill_gaps"  # predict every unannotated task lacking the current version
DELIVER = "plankton.deliver"  # write the outbox to Label Studio
SYNC = "plankton.sync"  # reconcile one project with Label Studio
SYNC_ALL = "plankton.sync_all"  # periodic: every project (Celery beat)
TICK = "plankton.tick"  # periodic: Redis-only checks that restart stalled work (Celery beat)
REFRESH_MAP = "plankton.refresh_map"  # recompute the status page's embedding map (worker/projection.py)
