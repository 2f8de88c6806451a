"""Writing predictions to Label Studio with label-studio-sdk 2.x, at most once per task and version.

Label Studio never de-duplicates predictions, so we do: before writing, each task is claimed in Redis
(`writing`); after Label Studio confirms, the claim becomes `written`. A write finishes or fails within
the client's timeout, so a `writing` claim older than `claim_timeout` belongs to a worker that died:
then Label Studio itself is asked whether the prediction arrived before the worker died. A younger
claim of another worker makes the job retry later (`ClaimBusy`), never write a second copy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from common.store import DELIVERED_BY_API, DELIVERED_BY_WORKER, WRITING, Store

log = logging.getLogger(__name__)


CLIENT_TIMEOUT_SECONDS = 60


class WriteBackError(RuntimeError):
    pass


class ClaimBusy(WriteBackError):
    """Another worker is writing some of these tasks right now; retry once its claim resolved."""


def make_client(base_url: str, api_key: str) -> Any:
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=base_url, api_key=api_key, timeout=CLIENT_TIMEOUT_SECONDS)


class WriteBack:
    def __init__(self, client: Any, store: Store, claim_timeout: float = 2 * CLIENT_TIMEOUT_SECONDS) -> None:
        self.client = client
        self.store = store
        self.claim_timeout = claim_timeout

    def write(self, pid: int, version: str, predictions: Mapping[int, dict[str, Any]]) -> dict[int, str]:
        """Write the non-empty predictions; returns {task id: error} for those that failed."""
        todo = {tid: p for tid, p in predictions.items() if p.get("result")}
        claims = {tid: self._claim(pid, version, tid) for tid in todo}
        mine = [tid for tid, claim in claims.items() if claim == "mine"]
        busy = [tid for tid, claim in claims.items() if claim == "busy"]
        failed = self._write(pid, version, {tid: todo[tid] for tid in mine}) if mine else {}
        if busy:
            raise ClaimBusy(f"project {pid}: tasks {busy} are being written by another worker")
        return failed

    def _write(self, pid: int, version: str, todo: Mapping[int, dict[str, Any]]) -> dict[int, str]:
        from label_studio_sdk import PredictionRequest

        mine = list(todo)
        request = [
            PredictionRequest(task=tid, result=todo[tid]["result"], score=todo[tid]["score"], model_version=version)
            for tid in mine
        ]
        try:
            created = self.client.projects.import_predictions(id=pid, request=request).created
        except Exception as exc:
            # A timeout may still have stored them: settle each claim by asking Label Studio, or, if it
            # cannot answer either, leave the claims to expire and be settled on a retry.
            try:
                self._settle(pid, version, mine)
            except Exception:
                log.warning("project %s: cannot check %d predictions after a failed write", pid, len(mine))
            raise WriteBackError(f"writing {len(mine)} predictions to Label Studio failed: {exc}") from exc
        if created == len(mine):
            self.store.set_delivery(pid, version, mine, DELIVERED_BY_WORKER)
            return {}
        # Invalid items are silently dropped by Label Studio: find out which ones arrived.
        log.warning("project %s: Label Studio created %s of %d predictions", pid, created, len(mine))
        return {
            tid: "Label Studio did not store the prediction (is it valid for the project's config?)"
            for tid in self._settle(pid, version, mine)
        }

    def _settle(self, pid: int, version: str, task_ids: list[int]) -> list[int]:
        """Mark the tasks Label Studio has as written, release the others; returns the others."""
        missing = []
        for tid in task_ids:
            if self._exists_in_label_studio(tid, version):
                self.store.set_delivery(pid, version, [tid], DELIVERED_BY_WORKER)
            else:
                self.store.release_delivery(pid, version, [tid])
                missing.append(tid)
        return missing

    def _claim(self, pid: int, version: str, tid: int) -> str:
        """ "mine" (write it), "done" (already in Label Studio) or "busy" (another live writer)."""
        if self.store.claim_delivery(pid, version, tid, WRITING):
            return "mine"
        by, since = self.store.delivery(pid, version, [tid]).get(tid, ("", 0.0))
        if by in (DELIVERED_BY_API, DELIVERED_BY_WORKER):
            return "done"
        if time.time() - since < self.claim_timeout:
            return "busy"
        if self._exists_in_label_studio(tid, version):
            self.store.set_delivery(pid, version, [tid], DELIVERED_BY_WORKER)
            return "done"
        log.info("task %s: taking over a stale write claim for %s", tid, version)
        self.store.set_delivery(pid, version, [tid], WRITING)
        return "mine"

    def _exists_in_label_studio(self, tid: int, version: str) -> bool:
        return any(p.model_version == version for p in self.client.predictions.list(task=tid))
