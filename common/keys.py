"""Every Redis key the backend uses, one function each, with its type and value format (as rq's keys.py).

Task ids, annotation ids and project ids are decimal strings; times are Unix seconds. `space` is the
embedding space (`<backbone>-<size>px`): features are comparable only within one.
"""

from __future__ import annotations

PREFIX = "plk"


def _p(pid: int, *parts: object) -> str:
    return ":".join([PREFIX, "p", str(pid), *map(str, parts)])


# -- deployment-wide -----------------------------------------------------------------------------------


def epoch() -> str:
    """STRING: a token made when this Redis state was first used. Version names carry it, so a version
    name is never reused even if Redis loses everything."""
    return f"{PREFIX}:epoch"


def projects() -> str:
    """SET of project ids the backend has heard of (from /setup, /predict or a webhook)."""
    return f"{PREFIX}:projects"


def content_embedding(space: str, sha256: str) -> str:
    """STRING, 30 days: float16 features of an image's bytes, so the same image is never embedded twice."""
    return f"{PREFIX}:emb:{space}:{sha256}"


def beat_lock(name: str) -> str:
    """STRING lock: one periodic run (`tick`, `sync_all`) at a time across every beat and worker."""
    return f"{PREFIX}:lock:{name}"


def ingest_progress() -> str:
    """STRING time: when a worker last started or settled part of a chunk, of any project. While it moves, a
    task queued long ago is waiting behind others in the bulk queue, not lost."""
    return f"{PREFIX}:ingest-progress"


def deliveries(message_id: str) -> str:
    """STRING int, 1 day: how often a Celery message was started; a message that keeps killing its worker
    is failed with a reason after a few."""
    return f"{PREFIX}:msg:{message_id}:starts"


# -- one project: configuration and model versions -------------------------------------------------------


def label_config(pid: int) -> str:
    """STRING: the project's labelling config XML, as Label Studio last sent it."""
    return _p(pid, "config")


def model_scope(pid: int) -> str:
    """STRING `project` | `bucket`: the project's Extra params `model_scope` (MODEL_SCOPE when absent)."""
    return _p(pid, "scope")


def version(pid: int) -> str:
    """STRING: the current model version, what /setup returns and every written prediction carries."""
    return _p(pid, "version")


def version_counter(pid: int) -> str:
    """STRING int: the number of the last version made (INCR)."""
    return _p(pid, "version_counter")


def versions(pid: int) -> str:
    """LIST of JSON {version, created, reason, tasks, annotated, evidence, ...}: every published version."""
    return _p(pid, "versions")


def version_meta(pid: int, version_name: str) -> str:
    """STRING JSON: what a version was fitted on and how well (the `versions` entry, read in one GET)."""
    return _p(pid, "meta", version_name)


def fitted_labels(pid: int, version_name: str) -> str:
    """STRING JSON {task: {tag: [labels]}}: the annotations a version learned from, kept with its model."""
    return _p(pid, "fitted", version_name)


def model(pid: int, version_name: str) -> str:
    """STRING bytes: a fitted model (worker.project_model.model_to_bytes), written before it is published;
    the last few versions are kept, so every worker host predicts with exactly that version's model."""
    return _p(pid, "model", version_name)


# -- one project: tasks, features, annotations ---------------------------------------------------------


def task_data(pid: int) -> str:
    """HASH task -> JSON task data as Label Studio sent it: every task the backend knows of."""
    return _p(pid, "data")


def images(pid: int) -> str:
    """HASH task -> the image reference its features were made from (an image collection, per bucket)."""
    return _p(pid, "image")


def embeddings(pid: int, space: str) -> str:
    """HASH task -> float16 features (bytes)."""
    return _p(pid, "emb", space)


def pending(pid: int) -> str:
    """HASH task -> time it was queued for embedding and not yet settled (so it is not queued twice)."""
    return _p(pid, "pending")


def staging(pid: int) -> str:
    """ZSET chunk token -> deadline: chunks that stored features (which unqueued their tasks) and have not yet
    staged those tasks' predictions. The deliverer counts them as more on its way; a chunk that dies in
    between is forgotten at its deadline."""
    return _p(pid, "staging")


def unfinished_starts(pid: int) -> str:
    """HASH task -> how often a chunk holding it was started and did not finish (its worker process died),
    since the task was last split off into a chunk of its own (worker/crashing_chunks.py); 1 day."""
    return _p(pid, "unfinished-starts")


def failed(pid: int) -> str:
    """HASH task -> JSON {reason, transient, at}: why the task has no features (its image failed)."""
    return _p(pid, "failed")


def annotations(pid: int) -> str:
    """HASH task -> JSON {annotation id: {tag: [labels]}}: each live, not cancelled annotation of the task.
    A task in this hash is annotated; its truth is the newest annotation (highest id) with labels."""
    return _p(pid, "labels")


def annotation_tasks(pid: int) -> str:
    """HASH annotation id -> task: to find the task of a deleted annotation."""
    return _p(pid, "ann")


def annotations_heard(pid: int) -> str:
    """HASH task -> time (s): when a webhook last changed the task's annotations. A sweep that began reading
    Label Studio before then leaves the task as the webhook left it."""
    return _p(pid, "labels_heard")


def label_changes(pid: int) -> str:
    """STRING int: annotation changes since the last fit began (the REFIT_EVERY counter)."""
    return _p(pid, "changes_since_fit")


def refit_scheduled(pid: int) -> str:
    """STRING with a TTL: a debounced refit is on its way (REFIT_DELAY_SECONDS)."""
    return _p(pid, "refit_scheduled")


# -- one project: predictions and their delivery to Label Studio -----------------------------------------


def predictions(pid: int, version_name: str) -> str:
    """HASH task -> JSON Label Studio prediction {result, score, model_version} computed by that version's
    model. An empty `result` means the model has no evidence for the task."""
    return _p(pid, "pred", version_name)


def delivery(pid: int, version_name: str) -> str:
    """HASH task -> `<state>:<time>`, state `writing` (a write whose outcome is not known yet), `written`
    (Label Studio holds it), `api` (handed over in a /predict reply) or `refused` (Label Studio dropped it as
    invalid). Set with HSETNX: one writer."""
    return _p(pid, "delivered", version_name)


def outbox(pid: int) -> str:
    """ZSET `<task>@<version>` -> when it is due: predictions to write to Label Studio, kept until
    delivered or superseded by a newer version (the persistent outbox)."""
    return _p(pid, "outbox")


def outbox_jobs(pid: int) -> str:
    """HASH `<task>@<version>` -> job id: whose job reports a prediction Label Studio refuses."""
    return _p(pid, "outbox_jobs")


def shown(pid: int) -> str:
    """HASH task -> `<version>\t<score>\t<labels digest>`: what Label Studio holds for the task under the live
    version name (common/store.py `live_version`), the answer of which model version. A refit writes only
    the tasks whose answer differs from this (common/revisions.py)."""
    return _p(pid, "shown")


def refresh_due(pid: int) -> str:
    """STRING time, expiring then: when the changes staged since away from the frontier are written (one such
    write every REFRESH_SECONDS, common/revisions.py)."""
    return _p(pid, "refresh_due")


def switched(pid: int) -> str:
    """STRING: the live version name this backend set as the project's `model_version` in Label Studio, so that
    Label Studio shows it without calling /setup and /predict for each task opened; `-` when someone else
    chose the project's model version (then left alone)."""
    return _p(pid, "switched")


def write_seconds(pid: int) -> str:
    """STRING float: how long the project's last successful write to Label Studio took (its cost per request
    grows with the project's size; the deliverer lingers longer for fuller writes when it is high)."""
    return _p(pid, "write_seconds")


def delivery_failures(pid: int) -> str:
    """STRING int: consecutive failed writes to Label Studio (the backoff exponent)."""
    return _p(pid, "delivery_failures")


def notify(pid: int, task: int) -> str:
    """LIST, 30 s: a /predict waiting for this task's prediction is woken by a push."""
    return _p(pid, "notify", task)


def waiters(pid: int) -> str:
    """HASH task -> how many /predict calls wait for its prediction now (renewed by each wait, 60 s): a
    worker storing predictions pushes to `notify` only for these tasks, not for every task of an import."""
    return _p(pid, "waiters")


def lock(pid: int, name: str) -> str:
    """STRING lock with a lease that its holder keeps extending (`refit`, `deliver`, `gaps`, `sync`)."""
    return _p(pid, "lock", name)


def sync_asked(pid: int) -> str:
    """HASH: a sync asked for and not yet done (`token` of the last ask, `retrain` the token of an ask that
    wanted a retrain, `at` the time of the last ask). A sync that finds its lock held leaves it here; the
    holder, or the tick, sends another once the lock is free, and a sync clears it only when done."""
    return _p(pid, "sync_asked")


def last_sync(pid: int) -> str:
    """STRING JSON: the last reconciliation with Label Studio (when, and what it fixed)."""
    return _p(pid, "last_sync")


def map_scheduled(pid: int) -> str:
    """STRING with a TTL: a refresh of the project's map is on its way (one a minute however often it refits)."""
    return _p(pid, "map_scheduled")


def projection(pid: int) -> str:
    """STRING, gzip-compressed JSON: the embedding map of the status page (worker/projection.py), rewritten
    by the worker after each refit, never computed in a request. {format: 1, version, computed, method,
    explained, total, tasks: [task], x: [0..4095], y: [0..4095], annotated: [0|1], tags: [{name, labels,
    codes: [label index | -1]}], thumbs: {task: "data:image/webp;base64,..."}}, one entry per point in each
    array; at most 50,000 points and 2,000 thumbnails of 1.5 MB in all (2 MB at most)."""
    return _p(pid, "projection")


# -- jobs ----------------------------------------------------------------------------------------------


def job(job_id: str) -> str:
    """HASH {kind, project, total, created}: a unit of work /jobs/<id> reports on (7 days)."""
    return f"{PREFIX}:job:{job_id}"


def job_done(job_id: str) -> str:
    """SET of items (task ids) the job finished."""
    return f"{PREFIX}:job:{job_id}:done"


def job_failed(job_id: str) -> str:
    """HASH item -> reason: what the job could not do, and why."""
    return f"{PREFIX}:job:{job_id}:failed"


def job_tasks(job_id: str) -> str:
    """STRING JSON [slim task]: a big import parked until a worker splits it into chunks."""
    return f"{PREFIX}:job:{job_id}:tasks"
