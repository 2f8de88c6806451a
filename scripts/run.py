"""`make run`: the whole backend on this machine, in the foreground: the Procfile's processes (API, worker,
beat, Flower) under honcho, against Redis at REDIS_URL.

- Settings come from the environment, then from ./.env (python-dotenv; variables already set win), then the
  defaults (common/settings.py). They are checked before anything starts.
- A REDIS_URL on this machine (loopback) where nothing answers gets a throw-away redis-server (no
  persistence), stopped last.
- Once the API answers, the URL to paste into Label Studio is printed.
- Ctrl-C (SIGINT or SIGTERM to this process, which is honcho's) stops everything; so does any process ending.

honcho runs in this process rather than as `honcho start`, which would let .env override the environment and
give the API PORT=5000.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import honcho.manager  # noqa: E402
import redis  # noqa: E402
from dotenv import load_dotenv  # noqa: E402
from honcho.environ import parse_procfile  # noqa: E402
from honcho.printer import Printer  # noqa: E402

from common.redact import redact_url  # noqa: E402
from common.settings import Settings, SettingsError, is_loopback  # noqa: E402

# How long the processes get to stop (a worker finishes its batch) before honcho kills them.
STOP_SECONDS = 20


def log(message: str) -> None:
    print(f"[run] {message}", file=sys.stderr, flush=True)


def redis_error(url: str) -> str | None:
    """None when Redis answers at url, else why not."""
    try:
        redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1).ping()
    except Exception as exc:  # any failure means: not usable
        return f"{type(exc).__name__}: {exc}"
    return None


def start_local_redis(url: str) -> subprocess.Popen[bytes] | None:
    """A throw-away redis-server where REDIS_URL points at this machine and nothing answers; None when one
    already answers. SystemExit when none answers and none can be started here."""
    why = redis_error(url)
    if why is None:
        log(f"Redis answers at {redact_url(url)}")
        return None
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    loopback = host == "localhost" or host.startswith("127.") or host == "::1"
    server = shutil.which("redis-server")
    if parts.scheme != "redis" or not loopback or not server:
        raise SystemExit(
            f"no Redis answers at REDIS_URL={redact_url(url)} ({why}).\n"
            "  Start one (`redis-server`, or `docker run -d -p 6379:6379 redis:7`) or set REDIS_URL to one that runs.\n"
            "  (make run starts redis-server itself only for a redis:// URL on this machine, when it is installed.)"
        )
    port = parts.port or 6379
    args = [server, "--port", str(port), "--bind", "127.0.0.1" if host == "localhost" else host]
    args += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
    if parts.password:
        args += ["--requirepass", unquote(parts.password)]
    log(
        f"nothing answers at {redact_url(url)} ({why}): starting a throw-away redis-server on port {port} "
        "(no persistence)"
    )
    # Its own session: Ctrl-C must not stop it before the processes that use it.
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, start_new_session=True)
    for _ in range(50):
        if redis_error(url) is None:
            log(f"redis-server started (pid {proc.pid})")
            return proc
        if proc.poll() is not None:
            raise SystemExit(f"redis-server exited at once (rc {proc.returncode}): is port {port} taken?")
        time.sleep(0.1)
    stop(proc)
    raise SystemExit(f"redis-server started but does not answer at {redact_url(url)}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def this_host() -> str:
    """This machine's address on its outgoing interface (no packet is sent), else localhost."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
        except OSError:
            return "localhost"


def banner_when_up(settings: Settings, stopping: threading.Event) -> None:
    """Print where everything is once the API answers /health (or say that it does not)."""
    local = "127.0.0.1" if settings.api_address in ("0.0.0.0", "::") else settings.api_address
    health = f"http://{local}:{settings.port}/health"
    deadline = time.monotonic() + 120
    while not stopping.is_set():
        try:
            with urllib.request.urlopen(health, timeout=1):
                break
        except OSError as exc:
            if getattr(exc, "code", None) == 401:  # basic auth: it answers
                break
            if time.monotonic() > deadline:
                log(f"the API does not answer at {health} after 120 s: see its output above")
                return
            stopping.wait(0.5)
    if stopping.is_set():
        return
    print(banner(settings), flush=True)


def banner(settings: Settings) -> str:
    """Where everything is, and how to reach the API from elsewhere (README "Connect Label Studio", "Security")."""
    every_interface = settings.api_address in ("0.0.0.0", "::")
    flower = f"http://{settings.flower_address}:{settings.flower_port}"
    flower_auth = " (basic auth: FLOWER_BASIC_AUTH)" if settings.flower_basic_auth else ""
    auth = "basic auth: BASIC_AUTH_USER / BASIC_AUTH_PASS" if settings.basic_auth_user else "no auth"
    if is_loopback(settings.api_address):
        only = f"this machine only: API_ADDRESS={settings.api_address}"
        where = f"""      http://localhost:{settings.port}    ({auth}; {only})
  Label Studio must run on this machine, not in a container: Label Studio in Docker cannot reach
  127.0.0.1 of this host. To reach the backend from Docker or another machine, listen beyond loopback,
  with credentials (the API refuses to start without them there; README "Security"):
      API_ADDRESS=0.0.0.0 BASIC_AUTH_USER=... BASIC_AUTH_PASS=... WEBHOOK_SECRET=... BACKEND_URL=<that URL> make run
  and paste http://<this machine's address>:{settings.port} (from Docker:
  http://host.docker.internal:{settings.port}), ticking "Use basic auth" with the same user and password;
  BACKEND_URL is the URL you paste (only its webhook gets the secret header)."""
    else:
        host = this_host() if every_interface else settings.api_address
        tick = ' Tick "Use basic auth" with the same user and password.' if settings.basic_auth_user else ""
        where = f"""      http://{host}:{settings.port}    ({auth}; API_ADDRESS={settings.api_address})
  (http://localhost:{settings.port} if Label Studio runs on this host, not in a container; from Label Studio
  in Docker: http://host.docker.internal:{settings.port}.){tick}"""
        if settings.webhook_secret and not settings.backend_url:
            where += """
  BACKEND_URL is not set: set it to the URL you paste, or no webhook gets the X-Webhook-Secret header."""
    return f"""
==============================================================================================
  ML backend URL to paste into Label Studio (Settings > Model > Connect model):
{where}
  Label Studio must run with ML_BLOCK_LOCAL_IP=false and SSRF_PROTECTION_ENABLED=false.
  Flower (queues, workers, tasks): {flower}{flower_auth}
  Redis: {redact_url(settings.redis_url)}      Ctrl-C stops everything.
==============================================================================================
"""


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The processes find gunicorn and celery beside this Python (the virtualenv), and print at once.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    # Flower reads every FLOWER_* variable itself and fails on an empty number: empty means the default.
    return {k: v for k, v in env.items() if not (k.startswith("FLOWER_") and not v.strip())}


def main() -> int:
    os.chdir(ROOT)
    if load_dotenv(ROOT / ".env", override=False):
        log("read settings from .env (variables already set in the environment win)")
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        log(str(exc))
        return 2
    # The API, Flower and the worker check this themselves at start; said here first, before anything starts.
    problems = settings.api_exposure_problems() + settings.flower_exposure_problems()
    if problems := problems + settings.worker_metrics_exposure_problems():
        log("not starting:\n  " + "\n  ".join(problems))
        return 2
    redis_proc = start_local_redis(settings.redis_url)
    # The worker's metrics folder is set in its launch environment (worker/metrics.py says why), one of its own.
    worker_metrics = tempfile.mkdtemp(prefix="plankton-worker-metrics-")
    stopping = threading.Event()
    try:
        honcho.manager.KILL_WAIT = STOP_SECONDS
        manager = honcho.manager.Manager(Printer(sys.stdout, colour=sys.stdout.isatty()))
        env = child_env()
        for name, command in parse_procfile((ROOT / "Procfile").read_text()).processes.items():
            own = {"PROMETHEUS_MULTIPROC_DIR": worker_metrics} if name == "worker" else {}
            manager.add_process(name, command, env={**env, **own}, cwd=str(ROOT))
        threading.Thread(target=banner_when_up, args=(settings, stopping), daemon=True).start()
        # A closed terminal stops everything as Ctrl-C does (honcho handles SIGINT and SIGTERM).
        signal.signal(signal.SIGHUP, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
        manager.loop()  # until Ctrl-C, SIGTERM or any process ends; then stops the others
        return manager.returncode or 0
    finally:
        stopping.set()
        shutil.rmtree(worker_metrics, ignore_errors=True)
        if redis_proc is not None:
            log(f"stopping the redis-server started here (pid {redis_proc.pid})")
            stop(redis_proc)


if __name__ == "__main__":
    sys.exit(main())
