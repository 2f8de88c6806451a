"""gunicorn's configuration for the API: `gunicorn -c gunicorn.conf.py` (the Procfile, Dockerfile.api, compose
and tests/helpers.py all start it so). Every value comes from the settings (common/settings.py, README
"Configuration"): a value that is not allowed stops gunicorn here, before it binds, with the variable's name;
so does an API_ADDRESS beyond loopback without basic auth and a webhook secret (README "Security"), and, once
GUNICORN_CMD_ARGS and the command line have had their say, any address gunicorn would bind beyond loopback
without them (`on_starting`)."""

import os
import shutil
import tempfile
from pathlib import Path

from common.redact import install_log_redaction
from common.settings import SettingsError, get_settings

try:
    _settings = get_settings()
except SettingsError as exc:
    raise SystemExit(f"gunicorn.conf.py: {exc}") from None
if _problems := _settings.api_exposure_problems():
    raise SystemExit("gunicorn.conf.py: the API will not start:\n  " + "\n  ".join(_problems))
# Every log line of the master and its workers (access log included: query strings) without secrets.
install_log_redaction(_settings)

wsgi_app = "api.app:create_app()"
proc_name = "plankton-api"

_host = f"[{_settings.api_address}]" if ":" in _settings.api_address else _settings.api_address
bind = [f"{_host}:{_settings.port}"]

# gthread: /predict may wait PREDICT_WAIT_SECONDS for the worker while /health and /setup answer in
# milliseconds on the other threads.
worker_class = "gthread"
workers = _settings.api_workers
threads = _settings.api_threads
timeout = 60
graceful_timeout = 10
keepalive = 5

accesslog = "-"
errorlog = "-"
loglevel = _settings.log_level.lower()

# Prometheus: every API process counts into one multiprocess directory (api/metrics.py), fresh at each start.
# Set here, in the master, before any worker imports prometheus_client.
_metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
_own_metrics_dir = not _metrics_dir
if _own_metrics_dir:
    _metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="plankton-api-metrics-")
else:
    Path(_metrics_dir).mkdir(parents=True, exist_ok=True)
    for _old in Path(_metrics_dir).glob("*.db"):
        _old.unlink()


def on_starting(server):
    """The bind list as gunicorn will use it (GUNICORN_CMD_ARGS and `--bind` come after this file): every
    address beyond loopback needs the credentials too. A unix socket is this machine's; an inherited file
    descriptor (`fd://`) could be anything."""
    problems = []
    for address in server.cfg.address:
        if isinstance(address, str):
            continue
        host = f"fd://{address}" if isinstance(address, int) else address[0]
        problems += _settings.api_exposure_problems(host, where=f"gunicorn's bind {host or '(every interface)'}")
    if problems:
        raise SystemExit("gunicorn.conf.py: the API will not start:\n  " + "\n  ".join(dict.fromkeys(problems)))


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if _own_metrics_dir:
        shutil.rmtree(_metrics_dir, ignore_errors=True)
