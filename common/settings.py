"""Configuration from environment variables, read once per process."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def _env_int(name: str, default: int) -> int:
    raw = _env(name)
    return int(raw) if raw else default


def _env_float(name: str, default: float) -> float:
    raw = _env(name)
    return float(raw) if raw else default


def available_cores() -> int:
    """The cores this process may run on (the affinity mask, which containers set), not the host's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    label_studio_url: str = ""
    label_studio_api_key: str = ""
    basic_auth_user: str = ""
    basic_auth_pass: str = ""
    webhook_secret: str = ""
    log_level: str = "INFO"
    backbone: str = "efficientnet-lite0"
    weights: str = ""
    image_size: int = 0
    batch_size: int = 0
    device: str = "auto"
    predict_wait_seconds: float = 2.0
    chunk_size: int = 512
    download_timeout: float = 10.0
    download_workers: int = 8
    image_max_bytes: int = 20 * 1024 * 1024
    image_max_pixels: int = 40_000_000
    s3_endpoint_url: str = ""
    # Outbound guard and image limits (README "Fetching images safely").
    image_hosts: str = ""
    local_files_document_root: str = ""
    label_studio_base_data_dir: str = ""
    image_max_side: int = 10_000
    image_max_aspect: float = 100.0
    kmeans_clusters: int = 0
    refit_every: int = 5
    refit_delay_seconds: float = 10.0
    cefas_label_map: str = ""
    visibility_timeout: int = 120
    sync_interval_seconds: float = 300.0
    deliver_batch_size: int = 500
    model_scope: str = "project"
    worker_concurrency: int = 1
    torch_threads: int = 0
    torchscript: bool = True
    worker_nice: int = 10

    def threads_per_process(self) -> int:
        """TORCH_THREADS, else the worker's cores shared among its WORKER_CONCURRENCY processes."""
        return self.torch_threads or max(1, available_cores() // max(1, self.worker_concurrency))

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            redis_url=_env("REDIS_URL", cls.redis_url),
            label_studio_url=_env("LABEL_STUDIO_URL").rstrip("/"),
            label_studio_api_key=_env("LABEL_STUDIO_API_KEY"),
            basic_auth_user=_env("BASIC_AUTH_USER"),
            basic_auth_pass=_env("BASIC_AUTH_PASS"),
            webhook_secret=_env("WEBHOOK_SECRET"),
            log_level=_env("LOG_LEVEL", cls.log_level).upper(),
            backbone=_env("BACKBONE", cls.backbone),
            weights=_env("WEIGHTS"),
            image_size=_env_int("IMAGE_SIZE", 0),
            batch_size=_env_int("BATCH_SIZE", 0),
            device=_env("DEVICE", cls.device),
            predict_wait_seconds=_env_float("PREDICT_WAIT_SECONDS", cls.predict_wait_seconds),
            chunk_size=_env_int("CHUNK_SIZE", cls.chunk_size),
            download_timeout=_env_float("DOWNLOAD_TIMEOUT", cls.download_timeout),
            # Two download threads per core: enough to hide latency, few enough not to starve the model.
            download_workers=_env_int("DOWNLOAD_WORKERS", max(4, 2 * available_cores())),
            image_max_bytes=_env_int("IMAGE_MAX_BYTES", cls.image_max_bytes),
            image_max_pixels=_env_int("IMAGE_MAX_PIXELS", cls.image_max_pixels),
            s3_endpoint_url=_env("S3_ENDPOINT_URL"),
            image_hosts=_env("IMAGE_HOSTS"),
            # The names Label Studio reads (with or without its LABEL_STUDIO_ prefix), the same meaning.
            local_files_document_root=_env("LOCAL_FILES_DOCUMENT_ROOT", _env("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT")),
            label_studio_base_data_dir=_env("LABEL_STUDIO_BASE_DATA_DIR"),
            image_max_side=_env_int("IMAGE_MAX_SIDE", cls.image_max_side),
            image_max_aspect=_env_float("IMAGE_MAX_ASPECT", cls.image_max_aspect),
            kmeans_clusters=_env_int("KMEANS_CLUSTERS", 0),
            refit_every=_env_int("REFIT_EVERY", cls.refit_every),
            refit_delay_seconds=_env_float("REFIT_DELAY_SECONDS", cls.refit_delay_seconds),
            cefas_label_map=_env("CEFAS_LABEL_MAP"),
            visibility_timeout=_env_int("BROKER_VISIBILITY_TIMEOUT", cls.visibility_timeout),
            sync_interval_seconds=_env_float("SYNC_INTERVAL_SECONDS", cls.sync_interval_seconds),
            deliver_batch_size=_env_int("DELIVER_BATCH_SIZE", cls.deliver_batch_size),
            model_scope=_env("MODEL_SCOPE", cls.model_scope),
            # One process per core up to 4, each with cores/processes torch threads (README "Throughput").
            worker_concurrency=_env_int("WORKER_CONCURRENCY", min(4, available_cores())),
            torch_threads=_env_int("TORCH_THREADS", 0),
            torchscript=_env("TORCHSCRIPT", "1").lower() not in ("0", "false", "no", "off"),
            worker_nice=_env_int("WORKER_NICE", cls.worker_nice),
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings.from_env()
