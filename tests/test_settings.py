"""The settings table (common/settings.py): defaults, parsing, validation, the README's table; and the one launch
definition (Procfile, gunicorn.conf.py, the Celery configuration, Flower's) that every launcher uses."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.celery_app import make_celery
from common.settings import (
    BACKBONES,
    README_MARKER,
    Settings,
    SettingsError,
    available_cores,
    markdown_table,
    readme_table,
    settings_table,
)
from tests.helpers import REPO, procfile_command

# -- defaults ---------------------------------------------------------------------------------------------------


def test_the_defaults_are_one_thing_whether_read_from_an_empty_environment_or_not():
    assert Settings() == Settings.from_env({})
    cores = available_cores()
    assert Settings().download_workers == max(4, 2 * cores)
    assert Settings().worker_concurrency == min(4, cores)


def test_some_defaults():
    s = Settings.from_env({})
    assert (s.redis_url, s.log_level, s.backbone, s.device, s.model_scope) == (
        "redis://127.0.0.1:6379/0", "INFO", "efficientnet-lite0", "auto", "project"
    )  # fmt: skip
    assert (s.chunk_size, s.image_max_bytes, s.predict_wait_seconds, s.torchscript) == (512, 20 * 2**20, 2.0, True)
    assert (s.port, s.api_address, s.api_workers, s.api_threads) == (9090, "127.0.0.1", 2, 8)
    assert (s.flower_port, s.flower_address, s.flower_basic_auth) == (5555, "127.0.0.1", "")
    assert Settings.image_max_side == 10_000  # a class attribute too (worker/images.py reads it so)


def test_every_setting_has_a_variable_a_help_and_an_allowed_default():
    for f, var in settings_table():
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", var.name), f.name
        assert var.help and var.kind.allowed, f.name
        value = getattr(Settings(), f.name)
        assert var.kind.accepts(value), (f.name, value)
    names = [name for _, var in settings_table() for name in var.names]
    assert len(names) == len(set(names)), "a variable names two settings"


def test_secrets_are_not_in_repr():
    s = dataclasses.replace(Settings(), label_studio_api_key="k-123", basic_auth_user="u", basic_auth_pass="p-456")
    assert "k-123" not in repr(s) and "p-456" not in repr(s)


# -- parsing ----------------------------------------------------------------------------------------------------


def test_parsing():
    s = Settings.from_env(
        {
            "CHUNK_SIZE": " 64 ",
            "DOWNLOAD_TIMEOUT": "2.5",
            "TORCHSCRIPT": "off",
            "MODEL_SCOPE": "Bucket",
            "LOG_LEVEL": "debug",
            "DEVICE": "CUDA:1",
            "LABEL_STUDIO_URL": "http://ls:8080/",
            "WORKER_CONCURRENCY": "3",
            "IMAGE_SIZE": "",  # empty: the default
            "CEFAS_LABEL_MAP": '{"organism_type": {"copepod": "Plankton"}}',
            "FLOWER_BASIC_AUTH": "admin:pw-1,ops:pw-2",
        }
    )
    assert (s.chunk_size, s.download_timeout, s.torchscript, s.model_scope, s.log_level) == (
        64, 2.5, False, "bucket", "DEBUG"
    )  # fmt: skip
    assert (s.device, s.label_studio_url, s.worker_concurrency, s.image_size) == ("cuda:1", "http://ls:8080", 3, 0)
    assert s.flower_credentials() == ["admin:pw-1", "ops:pw-2"]
    assert Settings().flower_credentials() == []
    for text, value in [("1", True), ("true", True), ("YES", True), ("0", False), ("no", False)]:
        assert Settings.from_env({"TORCHSCRIPT": text}).torchscript is value


def test_label_studio_names_and_which_wins():
    s = Settings.from_env(
        {"LABEL_STUDIO_HOST": "https://ls.lb", "LABEL_STUDIO_ACCESS_TOKEN": "tok1", "WORKERS": "3", "THREADS": "4"}
    )
    assert (s.label_studio_url, s.label_studio_api_key, s.api_workers, s.api_threads) == ("https://ls.lb", "tok1", 3, 4)
    both = Settings.from_env({"LABEL_STUDIO_URL": "http://a:1", "LABEL_STUDIO_HOST": "http://b:2"})
    assert both.label_studio_url == "http://a:1"


# -- validation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "allowed"),
    [
        ("MODEL_SCOPE", "galaxy", "project or bucket"),
        ("CHUNK_SIZE", "-3", "an integer ≥ 1"),
        ("CHUNK_SIZE", "lots", "an integer ≥ 1"),
        ("DEVICE", "tpu", "cuda:<n>"),
        ("DOWNLOAD_TIMEOUT", "abc", "a number > 0"),
        ("DOWNLOAD_TIMEOUT", "nan", "a number > 0"),
        ("PORT", "70000", "from 1 to 65535"),
        ("TORCHSCRIPT", "maybe", "1 or 0"),
        ("REDIS_URL", "http://redis:6379", "redis://"),
        ("LABEL_STUDIO_URL", "localhost:8080", "http://"),
        ("BACKBONE", "vgg16", "resnet50-cefas"),
        ("LOG_LEVEL", "loud", "WARNING"),
        ("IMAGE_SIZE", "8", "≥ 16"),
        ("KMEANS_CLUSTERS", "1", "≥ 2"),
        ("WORKER_NICE", "20", "from 0 to 19"),
        ("CEFAS_LABEL_MAP", '{"tag": "Plankton"}', "JSON"),
        ("FLOWER_ADDRESS", "not an address", "IP address"),
        ("WORKERS", "0", "an integer ≥ 1"),
    ],
)
def test_a_value_that_is_not_allowed_names_its_variable_and_what_is(variable: str, value: str, allowed: str):
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({variable: value})
    assert f"{variable}={value!r}" in str(caught.value)
    assert allowed in str(caught.value)


def test_every_problem_is_reported_at_once_and_secrets_are_not_shown():
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"MODEL_SCOPE": "galaxy", "CHUNK_SIZE": "-3", "FLOWER_BASIC_AUTH": "admin-without-password"})
    assert len(caught.value.problems) == 3
    assert "FLOWER_BASIC_AUTH=(hidden)" in str(caught.value) and "admin-without-password" not in str(caught.value)


@pytest.mark.parametrize("given", ["BASIC_AUTH_USER", "BASIC_AUTH_PASS"])
def test_half_set_basic_auth_stops_start_up(given: str):
    with pytest.raises(SettingsError, match=f"set both or neither \\(only {given} is set\\)"):
        Settings.from_env({given: "x"})
    assert Settings.from_env({"BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "p-12"}).basic_auth_user == "u"


def test_settings_made_in_code_are_checked_too():
    with pytest.raises(SettingsError, match=r"CHUNK_SIZE \(chunk_size\)=0"):
        dataclasses.replace(Settings.from_env({}), chunk_size=0)
    with pytest.raises(SettingsError, match="BASIC_AUTH_USER and BASIC_AUTH_PASS"):
        Settings(basic_auth_user="u")


def test_the_backbones_are_the_registrys():
    from common.settings import DEFAULT_IMAGE_SIZE
    from worker.backbones import available_backbones

    assert sorted(BACKBONES) == available_backbones() == sorted(DEFAULT_IMAGE_SIZE)


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("MODEL_SCOPE", "PORT", "WORKERS", "API_WORKERS")}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env={**clean, **env}, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "code",
    [
        "from api.app import create_app; create_app()",  # the API factory
        "import worker.celery_app",  # what `celery -A worker.worker_app worker` loads first
        "import runpy; runpy.run_path('gunicorn.conf.py')",
        "import runpy; runpy.run_path('scripts/flowerconfig.py')",
        "import runpy; runpy.run_path('scripts/run.py', run_name='__main__')",
    ],
)
def test_a_bad_value_stops_each_process_at_start(code: str, tmp_path: Path):
    done = _run(code, MODEL_SCOPE="galaxy", PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    assert done.returncode != 0
    assert "MODEL_SCOPE='galaxy': allowed: project or bucket" in done.stderr, done.stderr[-2000:]


# -- the README's table -----------------------------------------------------------------------------------------


def test_the_readme_table_is_the_settings_table():
    """Fails when README.md's configuration table and common/settings.py differ: regenerate the table with
    `python -m common.settings --readme README.md`."""
    readme = (REPO / "README.md").read_text()
    assert README_MARKER in readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    assert readme_table(readme) == markdown_table(), "run: python -m common.settings --readme README.md"


def test_the_table_has_a_row_per_variable():
    table = markdown_table()
    for _, var in settings_table():
        assert f"| `{var.name}`" in table
    assert "TORCH_HOME" in table


def test_the_readme_check_sees_drift(tmp_path: Path):
    from common.settings import write_readme

    readme = tmp_path / "README.md"
    readme.write_text(f"## Configuration\n\n{README_MARKER}\n{markdown_table()}\n## Next\n")
    assert not write_readme(readme)
    readme.write_text(readme.read_text().replace("| `PORT` | `9090` |", "| `PORT` | `8080` |"))
    assert readme_table(readme.read_text()) != markdown_table()
    assert write_readme(readme) and readme_table(readme.read_text()) == markdown_table()
    assert readme.read_text().endswith("\n## Next\n")


# -- one launch definition --------------------------------------------------------------------------------------


def procfile() -> dict[str, list[str]]:
    lines = (REPO / "Procfile").read_text().splitlines()
    return {name: procfile_command(name) for name, _, _ in (ln.partition(":") for ln in lines if ln and ln[0] != "#")}


def test_the_procfile():
    assert procfile() == {
        "api": ["gunicorn", "-c", "gunicorn.conf.py"],
        "worker": ["celery", "-A", "worker.worker_app", "worker"],
        "beat": ["celery", "-A", "worker.celery_app", "beat"],
        "flower": ["celery", "-A", "worker.celery_app", "flower", "--conf=scripts/flowerconfig.py"],
    }


def _cmd(dockerfile: str) -> list[str]:
    line = next(ln for ln in (REPO / dockerfile).read_text().splitlines() if ln.startswith("CMD "))
    return json.loads(line[4:])


def _compose_commands() -> dict[str, list[str]]:
    import yaml

    services = yaml.safe_load((REPO / "compose.yml").read_text())["services"]
    # The backend's own services (built from this repository), not Redis's or Label Studio's images.
    return {name: s["command"] for name, s in services.items() if "command" in s and "build" in s}


def test_the_dockerfiles_and_compose_start_the_procfiles_commands():
    commands = procfile()
    assert _cmd("Dockerfile.api") == commands["api"]
    assert _cmd("Dockerfile.worker") == commands["worker"]
    assert _compose_commands() == {"beat": commands["beat"], "flower": commands["flower"]}


def test_no_launcher_repeats_an_option_of_the_configuration():
    options = ["-Q", "--queues", "-O", "--prefetch-multiplier", "-c", "--concurrency", "-l", "--loglevel", "--bind",
               "-b", "-w", "--workers", "--threads", "-k", "--worker-class", "--timeout", "--port", "--address",
               "--basic[_-]auth"]  # fmt: skip
    repeated = re.compile(f"({'|'.join(options)})\\b")
    launchers = {
        "Procfile": " ".join(" ".join(c) for c in procfile().values()).replace("gunicorn -c gunicorn.conf.py", ""),
        "compose.yml": " ".join(" ".join(c) for c in _compose_commands().values()),
        "Dockerfile.api": " ".join(_cmd("Dockerfile.api")).replace("gunicorn -c gunicorn.conf.py", ""),
        "Dockerfile.worker": " ".join(_cmd("Dockerfile.worker")),
    }
    for name, text in launchers.items():
        assert not repeated.search(text), (name, text)
    helpers = (REPO / "tests" / "helpers.py").read_text()
    assert helpers.count("procfile_command(") >= 4  # ApiProcess, WorkerProcess, BeatProcess use the Procfile's
    assert not re.search(r'"(-Q|-c|--prefetch-multiplier|-O|-l|-w|-k|--threads|-b)"', helpers)


def test_the_worker_options_are_in_the_celery_configuration():
    conf = make_celery(dataclasses.replace(Settings.from_env({}), worker_concurrency=3)).conf
    assert [q.name for q in conf.task_queues] == ["interactive", "control", "bulk"]  # this order, without -Q
    assert conf.broker_transport_options["queue_order_strategy"] == "priority"
    assert (conf.worker_prefetch_multiplier, conf.worker_concurrency, conf.task_acks_late) == (1, 3, True)


def test_fair_scheduling_is_celerys_default():
    """`-O fair` has no configuration key; Celery's default profile is the same strategy, so no launcher
    passes it. Fails if a Celery release changes that."""
    from celery.bin.worker import worker as worker_command
    from celery.concurrency.asynpool import SCHED_STRATEGIES, SCHED_STRATEGY_FAIR

    default = next(p.default for p in worker_command.params if p.name == "optimization")
    assert SCHED_STRATEGIES[default] == SCHED_STRATEGY_FAIR


def test_gunicorn_conf_reads_the_settings(tmp_path: Path):
    names = ["wsgi_app", "bind", "worker_class", "workers", "threads", "timeout", "loglevel", "accesslog"]
    code = (
        f"import json, runpy; c = runpy.run_path('gunicorn.conf.py'); print(json.dumps({{k: c[k] for k in {names}}}))"
    )
    done = _run(code, PORT="9123", API_ADDRESS="127.0.0.1", WORKERS="3", LOG_LEVEL="warning",
                PROMETHEUS_MULTIPROC_DIR=str(tmp_path))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "wsgi_app": "api.app:create_app()", "bind": ["127.0.0.1:9123"], "worker_class": "gthread", "workers": 3,
        "threads": 8, "timeout": 60, "loglevel": "warning", "accesslog": "-",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, {"address": "127.0.0.1", "port": 5555, "basic_auth": []}),
        ({"FLOWER_BASIC_AUTH": "", "FLOWER_ADDRESS": "0.0.0.0", "ALLOW_UNAUTHENTICATED": "1"},
         {"address": "0.0.0.0", "port": 5555, "basic_auth": []}),
        ({"FLOWER_BASIC_AUTH": "a:pw-1,c:pw-2", "FLOWER_PORT": "5600"},
         {"address": "127.0.0.1", "port": 5600, "basic_auth": ["a:pw-1", "c:pw-2"]}),
    ],
)  # fmt: skip
def test_flower_conf_reads_the_settings(env: dict[str, str], expected: dict):
    code = "import json, runpy; c = runpy.run_path('scripts/flowerconfig.py'); "
    code += "print(json.dumps({k: c[k] for k in ('address', 'port', 'basic_auth', 'logging')}))"
    clean = {k: "" for k in ("FLOWER_BASIC_AUTH", "FLOWER_ADDRESS", "FLOWER_PORT", "LOG_LEVEL")}
    done = _run(code, **{**clean, **env})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {**expected, "logging": "info"}
