"""Flower's configuration: `celery -A worker.celery_app flower --conf=scripts/flowerconfig.py` (the Procfile and
compose start it so). The broker comes from the Celery app (REDIS_URL); the rest from the settings
(common/settings.py, README "Configuration"). Flower reads this file after its FLOWER_* variables, so these
values win: an empty FLOWER_BASIC_AUTH means no basic auth (Flower alone would lock everybody out), which is
allowed only on loopback (FLOWER_ADDRESS, 127.0.0.1 by default) or with ALLOW_UNAUTHENTICATED=1. Flower reads
its command line after this file, so the rule is checked again on the options it ends with (`--address`,
`--basic-auth`, `--auth`), before it listens.

Only names of Flower options belong at the top level here (tornado sets each one it knows): hence `_settings`,
and no `import logging` (`logging` is an option)."""

from flower.options import options as _options

from common.redact import install_log_redaction as _install_log_redaction
from common.settings import SettingsError, get_settings

try:
    _settings = get_settings()
except SettingsError as exc:
    raise SystemExit(f"flowerconfig.py: {exc}") from None
# Beyond loopback, Flower needs FLOWER_BASIC_AUTH (or ALLOW_UNAUTHENTICATED=1): README "Security".
if _settings.flower_exposure_problems():
    raise SystemExit("flowerconfig.py: Flower will not start:\n  " + "\n  ".join(_settings.flower_exposure_problems()))
_install_log_redaction(_settings)

address = _settings.flower_address
port = _settings.flower_port
basic_auth = _settings.flower_credentials()
logging = _settings.log_level.lower()


def _check_final_options() -> None:
    """Tornado calls this once Flower has read its command line, the last word on where it listens."""
    authenticated = bool(_options.basic_auth or _options.auth)
    if problems := _settings.flower_exposure_problems(_options.address, authenticated):
        raise SystemExit("flowerconfig.py: Flower will not start:\n  " + "\n  ".join(problems))


_options.add_parse_callback(_check_final_options)
