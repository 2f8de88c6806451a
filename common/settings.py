"""Configuration from environment variables, read once per process.

Every setting is declared once, as a field of `Settings` below, in the style of Flower's
``define(name, default, type, help)``: ``define(variable, default, kind, help)`` names its environment
variable (with the name Label Studio's own ML backends use, where one exists), its default, how its text is
read and what is allowed (the `Kind`), and what it does. From that one declaration come `Settings.from_env()`,
the validation (a value that is not allowed stops start-up with the variable's name and what is allowed) and
the README's configuration table:

    python -m common.settings                     # read and check this environment's settings, print them
    python -m common.settings --markdown          # print the README's table
    python -m common.settings --readme README.md  # write it into README's "## Configuration"
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import math
import os
import re
import socket
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from common.redact import MIN_SECRET_LENGTH


def available_cores() -> int:
    """The cores this process may run on (the affinity mask, which containers set), not the host's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class SettingsError(ValueError):
    """Settings the backend cannot start with: one problem a line, each naming its variable."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid settings (README, Configuration):\n  " + "\n  ".join(problems))


# -- kinds: how a variable's text becomes a value, and which values are allowed ------------------------------


def _any(_: Any) -> bool:
    return True


def _code(value: Any) -> str:
    return f"`{value}`" if value != "" else "—"


@dataclass(frozen=True)
class Kind:
    """`parse` turns the variable's text into a value (ValueError if it cannot); `accepts` says whether a
    value is allowed; `allowed` says the same in words, for the error messages and the README; `show` is how
    the README shows a default."""

    allowed: str
    parse: Callable[[str], Any]
    accepts: Callable[[Any], bool] = _any
    show: Callable[[Any], str] = _code


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(low: int = 0, high: int | None = None, *, zero: str = "", unit: int = 0, unit_name: str = "") -> Kind:
    """Whole numbers from `low` (to `high`); `zero`: 0 is allowed too and means that. `unit`: the README shows
    a default as a multiple of it (bytes in MiB)."""
    span = f"an integer ≥ {low}" if high is None else f"an integer from {low} to {high}"

    def accepts(v: Any) -> bool:
        return _is_int(v) and (bool(zero and v == 0) or (v >= low and (high is None or v <= high)))

    def show(v: int) -> str:
        return f"`{v}` ({v // unit} {unit_name})" if unit and v and v % unit == 0 else f"`{v}`"

    return Kind(f"`0` ({zero}) or {span}" if zero else span, lambda s: int(s), accepts, show)


def number(low: float = 0.0, *, above: bool = False) -> Kind:
    """Finite decimal numbers ≥ `low` (> `low` when `above`)."""

    def accepts(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and (
            v > low if above else v >= low
        )  # fmt: skip

    return Kind(f"a number {'>' if above else '≥'} {low:g}", float, accepts, lambda v: f"`{v:g}`")


def choice(*values: str, normalise: Callable[[str], str] = str.lower) -> Kind:
    names = [f"`{v}`" for v in values]
    words = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
    return Kind(words, normalise, lambda v: v in values)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _parse_bool(text: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise ValueError(text)


BOOLEAN = Kind(
    "`1` or `0` (`true`/`false`, `yes`/`no`, `on`/`off`)",
    _parse_bool,
    lambda v: isinstance(v, bool),
    lambda v: "`1`" if v else "`0`",
)


def text(allowed: str = "any text") -> Kind:
    return Kind(allowed, str, lambda v: isinstance(v, str))


def url(*schemes: str, optional: bool = True) -> Kind:
    """A URL with one of these schemes and a host (unix:// a path); a trailing / is dropped from http(s)."""

    def parse(s: str) -> str:
        return s.rstrip("/") if s.startswith(("http://", "https://")) else s

    def accepts(v: Any) -> bool:
        if not isinstance(v, str):
            return False
        if v == "":
            return optional
        try:
            parts = urlsplit(v)
            _ = parts.port  # raises ValueError on a port that is not a number
        except ValueError:
            return False
        return parts.scheme in schemes and bool(parts.netloc or (parts.scheme == "unix" and parts.path))

    starts = [f"`{s}://`" for s in schemes]
    words = f"{', '.join(starts[:-1])} or {starts[-1]}" if len(starts) > 1 else starts[0]
    return Kind(f"{'empty or ' if optional else ''}a URL starting with {words}", parse, accepts)


_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")


def _is_address(v: Any) -> bool:
    if not isinstance(v, str):
        return False
    try:
        ipaddress.ip_address(v)
        return True
    except ValueError:
        return bool(_HOSTNAME.match(v))


ADDRESS = Kind("an IP address or host name", str, _is_address)


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return None
    return getattr(ip, "ipv4_mapped", None) or ip


def is_loopback(address: str) -> bool:
    """Whether a listening address is this machine only: 127.0.0.0/8, ::1 (also as ::ffff:127.x), or a name
    that resolves to loopback addresses only, as the server that binds it resolves it (`localhost`; not
    `x.localhost` where the resolver does not know it). Empty (every interface) and unresolvable are not."""
    if (ip := _ip(address)) is not None:
        return ip.is_loopback
    try:
        found = {str(info[4][0]) for info in socket.getaddrinfo(address, None, type=socket.SOCK_STREAM)}
    except (OSError, UnicodeError, ValueError):
        return False
    return bool(found) and all((ip := _ip(a)) is not None and ip.is_loopback for a in found)


PORT = integer(1, 65535)
DEVICE = Kind(
    "`auto` (CUDA when present), `cpu`, `cuda` or `cuda:<n>`",
    str.lower,
    lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None,
)


def _is_label_map(v: Any) -> bool:
    """{tag: {class: label}}, as JSON text."""
    if not isinstance(v, str):
        return False
    if v == "":
        return True
    try:
        tags = json.loads(v)
    except ValueError:
        return False
    return isinstance(tags, dict) and all(
        isinstance(m, dict) and all(isinstance(c, str) and isinstance(label, str) for c, label in m.items())
        for m in tags.values()
    )


LABEL_MAP = Kind('empty or JSON `{"tag": {"class": "label", ...}, ...}`', str, _is_label_map)


def _is_credentials(v: Any) -> bool:
    return isinstance(v, str) and all(
        user and password for user, _, password in (pair.partition(":") for pair in v.split(",") if v)
    )


CREDENTIALS = Kind("empty or `user:password`, comma-separated", str, _is_credentials)


# -- declaring a setting --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Computed:
    """A default computed when settings are made (from this machine), and how the README says it."""

    compute: Callable[[], Any]
    doc: str


@dataclass(frozen=True)
class Var:
    """What `define` records about a field: its variables, kind, help; what the default means; secrecy."""

    names: tuple[str, ...]
    kind: Kind
    help: str
    default_doc: str | Callable[[], str] = ""  # a function: what it says is read elsewhere (README only)
    secret: bool = False

    @property
    def name(self) -> str:
        return self.names[0]

    def read(self, environ: Mapping[str, str]) -> tuple[str, str] | None:
        """(variable, text) of the first of its variables set and not empty; None: the default applies."""
        for name in self.names:
            value = environ.get(name, "").strip()
            if value:
                return name, value
        return None

    def problem(self, name: str, value: Any) -> str:
        shown = "(hidden)" if self.secret else repr(value)
        return f"{name}={shown}: allowed: {self.kind.allowed.replace('`', '')}"


def define(
    variables: str | tuple[str, ...],
    default: Any,
    kind: Kind,
    help: str,
    *,
    default_doc: str | Callable[[], str] = "",
    secret: bool = False,
) -> Any:
    """A field of `Settings`: its environment variable(s) (the first one set wins), default (a value or a
    `Computed`), kind and help. Secrets are left out of repr() and of error messages."""
    names = (variables,) if isinstance(variables, str) else variables
    if isinstance(default, Computed):
        var = Var(names, kind, help, default.doc, secret)
        return field(default_factory=default.compute, repr=not secret, metadata={"var": var})
    if not kind.accepts(default):
        raise AssertionError(f"{names[0]}: the default {default!r} is not allowed by its own kind")
    return field(default=default, repr=not secret, metadata={"var": Var(names, kind, help, default_doc, secret)})


# Kept in step with worker/backbones.py's registry by tests/test_settings.py (this module imports no torch).
BACKBONES = ("efficientnet-lite0", "resnet18", "resnet50", "resnet50-cefas")
# IMAGE_SIZE=0 means the backbone's own. efficientnet-lite0: measured with bench/input_size.py on three kinds
# of labelled data (README "Input size"): 224 px gave the most accurate suggestions on average, and no
# smaller size came within 0.01 of it. The ResNets could not be measured here (no ImageNet or CEFAS weights
# on this machine); they were trained at 224 px too.
DEFAULT_IMAGE_SIZE = {"efficientnet-lite0": 224, "resnet18": 224, "resnet50": 224, "resnet50-cefas": 224}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MIB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    # -- Label Studio and the API's doors --
    label_studio_url: str = define(
        ("LABEL_STUDIO_URL", "LABEL_STUDIO_HOST"), "", url("http", "https"),
        "Label Studio's base URL, as the workers reach it (write-back, `/data/...` images)",
    )  # fmt: skip
    label_studio_api_key: str = define(
        ("LABEL_STUDIO_API_KEY", "LABEL_STUDIO_ACCESS_TOKEN"), "", text(),
        "personal access token or legacy token; a PAT is exchanged for access tokens", secret=True,
    )  # fmt: skip
    basic_auth_user: str = define(
        "BASIC_AUTH_USER", "", text(),
        "with `BASIC_AUTH_PASS`, protects every route but `/health` and `/` (and `/webhook`, see `WEBHOOK_SECRET`); "
        "set both or neither",
    )  # fmt: skip
    basic_auth_pass: str = define("BASIC_AUTH_PASS", "", text(), "see `BASIC_AUTH_USER`", secret=True)
    webhook_secret: str = define(
        "WEBHOOK_SECRET", "", text(),
        "`/webhook` requires the header `X-Webhook-Secret` with this value, or the basic auth above; unset, with "
        "basic auth set: the basic auth only (see *Security*)", secret=True,
    )  # fmt: skip
    backend_url: str = define(
        "BACKEND_URL", "", url("http", "https"),
        "the URL Label Studio reaches this backend at, as entered in *Connect model* (compose: `http://api:9090`): "
        "with `WEBHOOK_SECRET`, the workers add its header only to the project's webhook `<BACKEND_URL>/webhook` "
        "(empty: to none)",
    )  # fmt: skip
    allow_unauthenticated: bool = define(
        "ALLOW_UNAUTHENTICATED", False, BOOLEAN,
        "`1`: let the API (`API_ADDRESS`), Flower (`FLOWER_ADDRESS`) and a worker's metrics "
        "(`WORKER_METRICS_ADDRESS`) listen beyond loopback without credentials (see *Security*)",
    )  # fmt: skip
    log_level: str = define(
        "LOG_LEVEL", "INFO", choice(*LOG_LEVELS, normalise=str.upper), "API, worker, beat and Flower logging"
    )
    redis_url: str = define(
        "REDIS_URL", "redis://127.0.0.1:6379/0", url("redis", "rediss", "unix", optional=False),
        "broker and shared state (versions, predictions, embeddings, jobs)",
    )  # fmt: skip
    # -- the model --
    backbone: str = define("BACKBONE", "efficientnet-lite0", choice(*BACKBONES), "the image model")
    weights: str = define(
        "WEIGHTS", "", text("empty or a file path"),
        "weights file: required for `resnet50-cefas` (`cop-non-detritus-20211215.pth`), optional override for "
        "others",
    )  # fmt: skip
    image_size: int = define(
        "IMAGE_SIZE", 0, integer(16, zero="the backbone's default"),
        "side of the square the particle is padded and resized to (see *Input size*)",
        default_doc=lambda: _image_size_defaults(),
    )  # fmt: skip
    device: str = define("DEVICE", "auto", DEVICE, "where the model runs")
    batch_size: int = define(
        "BATCH_SIZE", 0, integer(1, zero="automatic"), "images per forward pass",
        default_doc="32 on CPU; on CUDA, a quarter of the card's memory shared among the worker processes",
    )  # fmt: skip
    torchscript: bool = define(
        "TORCHSCRIPT", True, BOOLEAN, "on CPU, run the model traced and frozen with TorchScript (`0`: eager PyTorch)"
    )
    tta: int = define(
        "TTA", 1, Kind("`1`, `2`, `4` or `8`", int, lambda v: _is_int(v) and v in (1, 2, 4, 8)),
        "test-time augmentation: each particle's embedding is the mean over this many of its turns and mirror "
        "images (`1`: off); the model runs that many times per image (see *How a tag picks its evidence*)",
    )  # fmt: skip
    # -- the worker --
    worker_concurrency: int = define(
        "WORKER_CONCURRENCY", Computed(lambda: min(4, available_cores()), "one per core, at most 4"), integer(1),
        "worker processes (Celery's `worker_concurrency`; each loads the model once)",
    )  # fmt: skip
    torch_threads: int = define(
        "TORCH_THREADS", 0, integer(1, zero="cores / worker processes"), "torch threads per worker process on CPU",
        default_doc="the cores / `WORKER_CONCURRENCY`",
    )  # fmt: skip
    worker_nice: int = define(
        "WORKER_NICE", 10, integer(0, 19),
        "CPU priority niceness of the worker processes: the API, on the same host, is served first (0: off)",
    )  # fmt: skip
    chunk_size: int = define(
        "CHUNK_SIZE", 512, integer(1),
        "tasks per bulk Celery message (smaller at the end of an import); a chunk gives way to interactive work "
        "after its batch in progress (see *Queues*)",
    )  # fmt: skip
    download_workers: int = define(
        "DOWNLOAD_WORKERS", Computed(lambda: max(4, 2 * available_cores()), "2 per core, at least 4"), integer(1),
        "concurrent image downloads over the network per worker process: enough to hide its latency, few enough "
        "not to starve the model (files read from disk have threads of their own: `READ_WORKERS`)",
    )  # fmt: skip
    read_workers: int = define(
        "READ_WORKERS", 1, integer(1),
        "threads per worker process that read images from this host's disk (Label Studio local files and "
        "uploads), 16 at a time: 1 for a local disk, where more only take turns with the GIL; more when that "
        "folder is a network mount whose reads wait",
    )  # fmt: skip
    download_timeout: float = define(
        "DOWNLOAD_TIMEOUT", 10.0, number(0, above=True),
        "seconds for a whole image fetch (connection, redirects, body)",
    )  # fmt: skip
    # -- images: limits and where they are read (README "Fetching images safely") --
    image_max_bytes: int = define(
        "IMAGE_MAX_BYTES", 20 * MIB, integer(1, unit=MIB, unit_name="MiB"), "larger downloads fail that task"
    )
    image_max_pixels: int = define("IMAGE_MAX_PIXELS", 40_000_000, integer(1), "larger images fail that task")
    image_max_side: int = define(
        "IMAGE_MAX_SIDE", 10_000, integer(1), "an image with a longer side fails that task (checked from its header)"
    )
    image_max_aspect: float = define(
        "IMAGE_MAX_ASPECT", 100.0, number(1), "an image longer than wide by more than this ratio fails that task"
    )
    image_hosts: str = define(
        "IMAGE_HOSTS", "", text("empty or comma-separated `host` or `host:port` (checked by the worker at start)"),
        "private image servers the workers may fetch from: `host` (any port) or `host:port` (that port only); see "
        "*Fetching images safely*",
    )  # fmt: skip
    local_files_document_root: str = define(
        ("LOCAL_FILES_DOCUMENT_ROOT", "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"), "", text("empty or a folder"),
        "Label Studio's variable, same meaning: where the worker sees the files of `/data/local-files/?d=<path>` "
        "(read from disk, else over HTTP)",
    )  # fmt: skip
    label_studio_base_data_dir: str = define(
        "LABEL_STUDIO_BASE_DATA_DIR", "", text("empty or a folder"),
        "Label Studio's data folder as the worker sees it: uploads (`/data/upload/...`) are read from its "
        "`media/upload/`",
    )  # fmt: skip
    s3_endpoint_url: str = define(
        "S3_ENDPOINT_URL", "", url("http", "https"),
        "S3-compatible endpoint for `s3://bucket/key` images (empty: AWS); credentials as boto3 reads them "
        "(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, ...)",
    )  # fmt: skip
    # -- learning --
    predict_wait_seconds: float = define(
        "PREDICT_WAIT_SECONDS", 2.0, number(0),
        "how long `/predict` for one task waits for the worker before answering `[]`",
    )  # fmt: skip
    refit_every: int = define("REFIT_EVERY", 5, integer(1), "refit after this many annotation changes...")
    refit_delay_seconds: float = define(
        "REFIT_DELAY_SECONDS", 5.0, number(0), "...or this long after the first change since the last fit"
    )
    kmeans_clusters: int = define(
        "KMEANS_CLUSTERS", 0, integer(2, zero="automatic"), "clusters per project",
        default_doc="automatic: √(n/2), 2..64",
    )  # fmt: skip
    cefas_label_map: str = define(
        "CEFAS_LABEL_MAP", "", LABEL_MAP, "how `resnet50-cefas` classes answer a tag before any annotation",
        default_doc='empty: `{"organism_type": {"copepod": "Plankton", "non-copepod": "Plankton", '
        '"detritus": "Debris"}}`',
    )  # fmt: skip
    model_scope: str = define(
        "MODEL_SCOPE", "project", choice("project", "bucket"),
        "one model per project, or per image collection (`bucket`); a project's *Extra params* `model_scope` wins",
    )  # fmt: skip
    # -- the queues and delivery --
    visibility_timeout: int = define(
        "BROKER_VISIBILITY_TIMEOUT", 120, integer(1),
        "seconds after which a message a dead worker held is redelivered (and a queued task whose message was "
        "lost is queued again)",
    )  # fmt: skip
    sync_interval_seconds: float = define(
        "SYNC_INTERVAL_SECONDS", 300.0, number(0),
        "how often beat reconciles every project with Label Studio (0: only on *Start training* and `POST /sync`); "
        "a project whose last listing took L seconds waits at least 10 L (large projects)",
    )  # fmt: skip
    deliver_batch_size: int = define(
        "DELIVER_BATCH_SIZE", 5000, integer(1),
        "predictions per write to Label Studio: each request costs it a fixed time that grows with the project's "
        "size (bench/RESULTS.md), so the fewer the better",
    )  # fmt: skip
    deliver_linger_seconds: float = define(
        "DELIVER_LINGER_SECONDS", 5.0, number(0),
        "how long predictions may wait in the outbox for a fuller write while an import is still being embedded: at "
        "least this, or 10 times Label Studio's last write, up to 60 s (0: write at once)",
    )  # fmt: skip
    set_project_model_version: bool = define(
        "SET_PROJECT_MODEL_VERSION", True, BOOLEAN,
        "once every task holds the live version, make it the project's model version in Label Studio, which then "
        "shows it without calling `/setup` and `/predict` for each task opened (and its uncertainty sampling works); "
        "a version chosen in Label Studio by hand is left alone",
    )  # fmt: skip
    # -- what one request may ask of the API (README "Security") --
    max_request_bytes: int = define(
        "MAX_REQUEST_BYTES", 32 * MIB, integer(1, unit=MIB, unit_name="MiB"),
        "a larger request body is refused (JSON 413) before it is read; Label Studio's `TASKS_CREATED` of 5,000 "
        "tasks measured 2.7 MB, so 20,000 tasks fit three times over, and parsing one body costs up to about 16 "
        "times its size in memory",
    )  # fmt: skip
    max_tasks_per_request: int = define(
        "MAX_TASKS_PER_REQUEST", 20_000, integer(1),
        "more tasks in one `/predict` are refused (JSON 413; the backend predicts every task itself, so *Retrieve "
        "predictions* is never needed on more); of a larger `TASKS_CREATED`, this many are queued and a sync lists "
        "the rest from Label Studio (a 413 without `LABEL_STUDIO_URL`)",
    )  # fmt: skip
    # -- launch (gunicorn.conf.py, scripts/flowerconfig.py, the Procfile) --
    api_address: str = define(
        "API_ADDRESS", "127.0.0.1", ADDRESS,
        "where the API listens (`gunicorn.conf.py`); beyond loopback (`0.0.0.0`: every interface) it needs "
        "`BASIC_AUTH_*` and `WEBHOOK_SECRET`, or `ALLOW_UNAUTHENTICATED=1`",
    )  # fmt: skip
    port: int = define("PORT", 9090, PORT, "the API's port")
    api_workers: int = define(("API_WORKERS", "WORKERS"), 2, integer(1), "API (gunicorn) processes")
    api_threads: int = define(
        ("API_THREADS", "THREADS"), 8, integer(1),
        "threads per API process: `/predict` may wait `PREDICT_WAIT_SECONDS` while `/health` answers at once",
    )  # fmt: skip
    worker_metrics_port: int = define(
        "WORKER_METRICS_PORT", 9808, integer(1, 65535, zero="off"),
        "where a worker serves its Prometheus metrics (`/metrics`; every pool process's counts); the API serves "
        "its own on its port",
    )  # fmt: skip
    worker_metrics_address: str = define(
        "WORKER_METRICS_ADDRESS", "127.0.0.1", ADDRESS,
        "where a worker serves its metrics, which have no auth (compose: its address on the backend network); "
        "beyond loopback it needs `ALLOW_UNAUTHENTICATED=1`",
    )  # fmt: skip
    flower_address: str = define(
        "FLOWER_ADDRESS", "127.0.0.1", ADDRESS,
        "where Flower listens (compose: `0.0.0.0`); beyond loopback it needs `FLOWER_BASIC_AUTH`, or "
        "`ALLOW_UNAUTHENTICATED=1`",
    )  # fmt: skip
    flower_port: int = define("FLOWER_PORT", 5555, PORT, "Flower's port")
    flower_basic_auth: str = define(
        "FLOWER_BASIC_AUTH", "", CREDENTIALS, "Flower's basic auth (empty: none, on loopback only)", secret=True
    )

    def __post_init__(self) -> None:
        problems = [
            var.problem(f"{var.name} ({f.name})", getattr(self, f.name))
            for f, var in settings_table()
            if not var.kind.accepts(getattr(self, f.name))
        ]
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            given = "BASIC_AUTH_USER" if self.basic_auth_user else "BASIC_AUTH_PASS"
            problems.append(f"BASIC_AUTH_USER and BASIC_AUTH_PASS: set both or neither (only {given} is set)")
        problems += self._short_secrets()
        if problems:
            raise SettingsError(problems)

    def _short_secrets(self) -> list[str]:
        """A secret shorter than MIN_SECRET_LENGTH cannot be masked in log lines (it would mask ordinary words),
        so it is refused: each setting declared secret, Flower's passwords and REDIS_URL's password."""
        where = [(var.name, getattr(self, f.name)) for f, var in settings_table()
                 if var.secret and f.name != "flower_basic_auth"]  # fmt: skip
        where += [("FLOWER_BASIC_AUTH", pair.partition(":")[2]) for pair in self.flower_credentials()]
        with contextlib.suppress(ValueError):  # a REDIS_URL that does not parse is refused by its kind
            where.append(("REDIS_URL (its password)", unquote(urlsplit(self.redis_url).password or "")))
        short = dict.fromkeys(name for name, value in where if value and len(value) < MIN_SECRET_LENGTH)
        return [f"{name}: at least {MIN_SECRET_LENGTH} characters (a shorter secret cannot be hidden in log lines)"
                for name in short]  # fmt: skip

    # -- the start-up rule: nothing listens beyond loopback without its credentials (README "Security") ------

    def api_exposure_problems(self, host: str | None = None, where: str | None = None) -> list[str]:
        """Why the API may not listen on `host` (API_ADDRESS unless given: gunicorn.conf.py checks each address
        gunicorn finally binds) with these settings (empty: it may). Beyond loopback it needs basic auth and a
        webhook secret, unless ALLOW_UNAUTHENTICATED says so."""
        host = self.api_address if host is None else host
        if is_loopback(host) or self.allow_unauthenticated:
            return []
        needed = (("basic auth (BASIC_AUTH_USER, BASIC_AUTH_PASS)", self.basic_auth_user),
                  ("webhook secret (WEBHOOK_SECRET)", self.webhook_secret))  # fmt: skip
        missing = [what for what, value in needed if not value]
        if not missing:
            return []
        where = where or f"API_ADDRESS={host}"
        return [
            f"{where} listens beyond loopback without a {' or a '.join(missing)}: anyone who "
            "reaches this port could read the projects and send webhooks. Set BASIC_AUTH_USER, BASIC_AUTH_PASS and "
            "WEBHOOK_SECRET (and enter the basic auth in Label Studio's Connect model form), or listen on "
            'API_ADDRESS=127.0.0.1, or set ALLOW_UNAUTHENTICATED=1 on a network you trust (README "Security")'
        ]

    def flower_exposure_problems(self, address: str | None = None, authenticated: bool | None = None) -> list[str]:
        """Why Flower may not listen on `address` (FLOWER_ADDRESS unless given) with these settings, or with
        `authenticated` (whether Flower's final options hold credentials: scripts/flowerconfig.py checks them
        once its command line is read); empty: it may."""
        address = self.flower_address if address is None else address
        authenticated = bool(self.flower_basic_auth) if authenticated is None else authenticated
        if is_loopback(address) or self.allow_unauthenticated or authenticated:
            return []
        return [
            f"Flower's address {address or '(every interface)'} is beyond loopback, but FLOWER_BASIC_AUTH is not set: "
            "Flower shows every task's arguments and errors and can stop workers. Set FLOWER_BASIC_AUTH=user:password, "
            "or listen on FLOWER_ADDRESS=127.0.0.1, or set ALLOW_UNAUTHENTICATED=1 on a network you trust "
            '(README "Security")'
        ]

    def worker_metrics_exposure_problems(self) -> list[str]:
        """Why a worker may not serve its metrics on WORKER_METRICS_ADDRESS (empty: it may). They have no auth,
        so beyond loopback only with ALLOW_UNAUTHENTICATED."""
        if not self.worker_metrics_port or is_loopback(self.worker_metrics_address) or self.allow_unauthenticated:
            return []
        return [
            f"WORKER_METRICS_ADDRESS={self.worker_metrics_address} serves the worker's metrics beyond loopback, "
            "without auth. Keep WORKER_METRICS_ADDRESS=127.0.0.1, set WORKER_METRICS_PORT=0, or set "
            'ALLOW_UNAUTHENTICATED=1 where only a network you trust reaches that address (README "Security")'
        ]

    def threads_per_process(self) -> int:
        """TORCH_THREADS, else the worker's cores shared among its WORKER_CONCURRENCY processes."""
        return self.torch_threads or max(1, available_cores() // max(1, self.worker_concurrency))

    def flower_credentials(self) -> list[str]:
        """FLOWER_BASIC_AUTH as Flower's `basic_auth` option takes it: one `user:password` an item."""
        return [pair for pair in self.flower_basic_auth.split(",") if pair]

    def deployment_secrets(self, environ: Mapping[str, str] | None = None) -> set[str]:
        """The values of this deployment's secrets, which log lines and error texts mask (common/redact.py):
        every setting declared `secret=True`, the password in REDIS_URL, Flower's passwords, and the AWS
        secrets boto3 reads from the environment."""
        environ = os.environ if environ is None else environ
        found = {getattr(self, f.name) for f, var in settings_table() if var.secret}
        found |= {pair.partition(":")[2] for pair in self.flower_credentials()}
        try:
            password = urlsplit(self.redis_url).password
        except ValueError:
            password = None
        if password:
            found |= {password, unquote(password)}
        found |= {environ.get(name, "") for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")}
        return {s for s in found if s}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings of this environment (an empty variable means its default); SettingsError, naming
        every variable whose value is not allowed, and what is, when any is not."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        problems: list[str] = []
        for f, var in settings_table():
            found = var.read(environ)
            if found is None:
                continue
            name, raw = found
            try:
                value = var.kind.parse(raw)
            except ValueError:
                value = None
            if value is None or not var.kind.accepts(value):
                problems.append(var.problem(name, raw))
            else:
                values[f.name] = value
        try:
            settings = cls(**values)  # every value is allowed: this checks how they go together
        except SettingsError as exc:
            problems += exc.problems
        if problems:
            raise SettingsError(problems)
        return settings


def settings_table() -> Iterator[tuple[Field[Any], Var]]:
    """Every setting: its dataclass field and what `define` recorded."""
    for f in fields(Settings):
        yield f, f.metadata["var"]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings.from_env()


# -- the README's table ---------------------------------------------------------------------------------------

# Variables that libraries read themselves: documented with the rest, not parsed here.
READ_BY_LIBRARIES = (
    ("TORCH_HOME", "`~/.cache/torch`",
     "torchvision ImageNet weights are read from `$TORCH_HOME/hub/checkpoints/` (never downloaded)"),
)  # fmt: skip

README_MARKER = "<!-- generated: python -m common.settings --readme README.md (tests/test_settings.py checks it) -->"


def _image_size_defaults() -> str:
    sizes: dict[int, list[str]] = {}
    for backbone, size in DEFAULT_IMAGE_SIZE.items():
        sizes.setdefault(size, []).append(f"`{backbone}`")
    each = "; ".join(f"{size} for {', '.join(names)}" for size, names in sizes.items())
    return f"the backbone's own: {each}"


def _default_text(f: Field[Any], var: Var) -> str:
    doc = var.default_doc() if callable(var.default_doc) else var.default_doc
    if f.default is MISSING:  # computed
        return doc
    shown = var.kind.show(f.default)
    if not doc:
        return shown
    return doc if f.default == "" else f"{shown} ({doc})"


def markdown_table() -> str:
    rows = ["| variable | default | allowed | what |", "| --- | --- | --- | --- |"]
    for f, var in settings_table():
        names = f"`{var.name}`" + "".join(f" (or `{alias}`)" for alias in var.names[1:])
        rows.append(f"| {names} | {_default_text(f, var)} | {var.kind.allowed} | {var.help} |")
    for name, default, help_ in READ_BY_LIBRARIES:
        rows.append(f"| `{name}` | {default} | (read by the library) | {help_} |")
    return "\n".join(rows) + "\n"


def readme_table(readme: str) -> str:
    """The table after the marker in README's "## Configuration" section (empty if there is none)."""
    lines = readme.splitlines(keepends=True)
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == README_MARKER) + 1
    except StopIteration:
        return ""
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "".join(lines[start:end])


def write_readme(path: Path) -> bool:
    """Replace the table after the marker with the generated one; whether anything changed."""
    readme = path.read_text()
    if README_MARKER not in readme:
        raise SystemExit(f"{path}: no line {README_MARKER!r} to put the table after")
    old = readme_table(readme)
    new = markdown_table()
    if old == new:
        return False
    head, _, tail = readme.partition(README_MARKER + "\n")
    path.write_text(head + README_MARKER + "\n" + new + tail[len(old) :])
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.settings", description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print the README's configuration table")
    parser.add_argument("--readme", type=Path, metavar="PATH", help="write the table into this README")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(markdown_table())
        return 0
    if args.readme:
        print(f"{args.readme}: {'table updated' if write_readme(args.readme) else 'table already current'}")
        return 0
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    for f, var in settings_table():
        value = "(hidden)" if var.secret and getattr(settings, f.name) else repr(getattr(settings, f.name))
        print(f"{var.name}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
