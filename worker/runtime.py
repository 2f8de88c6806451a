"""Per-process worker state: the model, the Label Studio client, the fetcher. Built once per process,
after fork (Celery's `worker_process_init`), never in the parent and never per task."""

from __future__ import annotations

import gc
import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from celery.signals import worker_init, worker_process_init

from common import queues
from common.collections import PER_BUCKET
from common.dispatch import Dispatcher
from common.label_config import LabelConfig, parse_label_config
from common.models import embedding_space
from common.settings import Settings, get_settings
from common.store import Store, version_number
from worker.celery_app import app
from worker.images import ImageFetcher
from worker.label_studio import LabelStudioApi
from worker.pipeline import EmbeddingPipeline
from worker.project_model import Model, ProjectModel, model_from_bytes

if TYPE_CHECKING:  # imported where used: torch loads in pool processes only, never in the main one
    from worker.embedder import Embedder

log = logging.getLogger(__name__)

DEFAULT_CEFAS_MAP = {"organism_type": {"copepod": "Plankton", "non-copepod": "Plankton", "detritus": "Debris"}}


class ModelMissing(RuntimeError):
    """A version's model is not in Redis: never predict with another one instead."""


@dataclass
class Runtime:
    settings: Settings

    @cached_property
    def store(self) -> Store:
        return Store.from_url(self.settings.redis_url, embedding_space(self.settings))

    @cached_property
    def dispatcher(self) -> Dispatcher:
        return Dispatcher(app, self.store, self.settings)

    @cached_property
    def embedder(self) -> Embedder:
        from worker.embedder import embedder_from_settings

        return embedder_from_settings(self.settings)

    @cached_property
    def fetcher(self) -> ImageFetcher:
        return ImageFetcher(self.settings)

    @cached_property
    def pipeline(self) -> EmbeddingPipeline:
        s = self.settings
        return EmbeddingPipeline(
            self.embedder, self.fetcher, self.store, s.download_workers, s.image_max_pixels, read_workers=s.read_workers
        )

    @cached_property
    def label_studio(self) -> LabelStudioApi | None:
        """None without LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY: predictions are then served by /predict only."""
        if not self.settings.label_studio_url or not self.settings.label_studio_api_key:
            log.warning("LABEL_STUDIO_URL or LABEL_STUDIO_API_KEY not set: predictions are served by /predict only")
            return None
        return LabelStudioApi(self.settings.label_studio_url, self.settings.label_studio_api_key)

    @cached_property
    def head_map(self) -> dict[str, dict[str, str]]:
        """How a backbone's own classes answer a tag before any annotation (resnet50-cefas)."""
        if self.settings.backbone != "resnet50-cefas":
            return {}
        return json.loads(self.settings.cefas_label_map) if self.settings.cefas_label_map else DEFAULT_CEFAS_MAP

    @cached_property
    def _models(self) -> OrderedDict[tuple[int, str], Model]:
        return OrderedDict()

    def project_model(self, pid: int, version: str) -> Model:
        """The model of that version, from Redis, where every worker host reads the same one. Version 0
        (nothing learned yet) knows only the backbone's head, if any."""
        key = (pid, version)
        if key not in self._models:
            blob = self.store.model_blob(pid, version)
            if blob is not None:
                model = model_from_bytes(blob)
            elif version_number(version) == 0:
                import numpy as np

                model = ProjectModel(version, np.zeros((0, 1), np.float32), {}, "", head_map=self.head_map)
            else:
                raise ModelMissing(f"project {pid}: the model of {version} is not in Redis")
            self._models[key] = model
            while len(self._models) > 16:
                self._models.popitem(last=False)
        return self._models[key]

    def model_answers(self, pid: int, version: str) -> bool:
        """False for version 0 without a backbone head: nothing learned, nothing to write to Label Studio."""
        return version_number(version) != 0 or bool(self.head_map)

    @cached_property
    def serves_interactive(self) -> bool:
        """Whether this worker consumes the interactive queue (`-Q`; all queues when not given)."""
        selected = app.amqp.queues.consume_from
        return not selected or queues.INTERACTIVE in selected

    def interactive_waiting(self) -> bool:
        """An interactive message sits in the broker, which none of this worker's processes has taken:
        a bulk chunk in this worker should give way. (Celery's Redis transport keeps a queue as a list
        under its name.)"""
        return self.serves_interactive and bool(self.store.r.llen(queues.INTERACTIVE))

    def per_collection(self, pid: int) -> bool:
        return (self.store.model_scope(pid) or self.settings.model_scope) == PER_BUCKET

    def label_config(self, pid: int) -> LabelConfig:
        xml = self.store.label_config(pid)
        if not xml:
            raise LookupError(f"no label config known for project {pid}: Label Studio has not called /setup yet")
        return parse_label_config(xml)


_runtime: Runtime | None = None
_lock = threading.Lock()


def runtime() -> Runtime:
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = Runtime(get_settings())
        return _runtime


@worker_init.connect
def _freeze_before_fork(**_: Any) -> None:
    """Move what the main process holds so far (modules, the SDK, settings) out of reach of the garbage
    collector, before the pool forks, as Python's docs advise for fork without exec. Otherwise each pool
    process's first full collection walks every inherited object and writes to each page that holds one,
    copying shared pages: it cost about a second of page faults in each process's first chunk
    (bench/RESULTS.md)."""
    gc.freeze()


@worker_process_init.connect
def _load_after_fork(**_: Any) -> None:
    """Load the model in each pool process as it starts, so the first task does not pay for it. Pool
    processes run at a lower CPU priority (WORKER_NICE): on a shared host the API answers Label Studio
    first, and the model takes every cycle the API does not need."""
    rt = runtime()
    if rt.settings.worker_nice > 0:
        os.nice(rt.settings.worker_nice)
    rt.embedder.warm_up()
    rt.store.r.ping()
