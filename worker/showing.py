"""Which predictions Label Studio shows: the project's model version, set to the live version once every task
holds it.

While a project's `model_version` names the backend's title (what connecting a backend sets), Label Studio
calls /setup, and /predict when the task lacks that version, for every task an annotator opens, and its
uncertainty sampling finds no task of that version and picks at random. Once it names a version string,
Label Studio shows the predictions of that version without asking (README "Connect Label Studio").
"""

from __future__ import annotations

import logging

from common.store import ours
from worker.label_studio import LabelStudioApi
from worker.runtime import Runtime

log = logging.getLogger(__name__)

SOMEONE_ELSE = "-"  # keys.switched: a person chose the project's model version; it is left alone


def unwritten(rt: Runtime, pid: int) -> int:
    """Unannotated tasks with an answer of the current version that Label Studio does not show yet."""
    store = rt.store
    version = store.current_version(pid)
    if not rt.model_answers(pid, version):
        return -1
    waiting = store.featured_tasks(pid) - store.annotated_tasks(pid) - store.shown_tasks(pid)
    answered = store.predictions(pid, version, waiting)
    return sum(1 for t in waiting if t not in answered or answered[t].get("result"))


def switch_when_complete(rt: Runtime, api: LabelStudioApi, pid: int) -> bool:
    """Set the project's model version to the live version once every task shows it, unless a person chose
    another version (a string this backend did not make); True when Label Studio now shows the live version."""
    live = rt.store.live_version()
    done = rt.store.switched_to(pid)
    if done in (live, SOMEONE_ELSE) or not rt.settings.set_project_model_version or unwritten(rt, pid) != 0:
        return done == live
    current = api.project_model_version(pid)
    if current and current != live and not ours(current) and current not in api.backend_titles(pid):
        rt.store.set_switched(pid, SOMEONE_ELSE)
        log.info("project %s: its model version is %r, chosen in Label Studio: left as it is", pid, current)
        return False
    if current != live:
        api.set_project_model_version(pid, live)
        log.info("project %s: every task shows %s; the project's model version is now that", pid, live)
    rt.store.set_switched(pid, live)
    return True


def check_switch(rt: Runtime, api: LabelStudioApi, pid: int) -> None:
    """The sweep: a project whose model version a person changed since is left as they chose it."""
    done = rt.store.switched_to(pid)
    if done and done != SOMEONE_ELSE and api.project_model_version(pid) != done:
        rt.store.set_switched(pid, SOMEONE_ELSE)
        log.info("project %s: its model version was changed in Label Studio: left as it is", pid)
