"""Property-based fuzzing of the real API (the Flask application, through its WSGI interface, against the real
Redis) from its own OpenAPI document (`GET /openapi.json`, api/openapi.py), with schemathesis.

For every operation of the document, schemathesis sends its examples, then generated requests, valid and
invalid (bodies, path and query parameters, missing credentials), and checks each answer: never a 5xx, a
status code and media type the document lists for that operation, a body that matches the documented schema,
credentials enforced where the document says so, invalid data refused with a 4xx. Bounded: at most
`FUZZ_EXAMPLES` generated requests per operation (hypothesis), no shrinking, a fixed seed (reproducible runs);
the whole module takes a few seconds to a few tens of seconds on two cores.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import time
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, seed, settings
from schemathesis.checks import positive_data_acceptance

from api.app import create_app
from api.openapi import DOCUMENT, EXAMPLE_CONFIG, EXAMPLE_PROJECT
from common.settings import Settings

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
USER, PASSWORD, SECRET = "fuzz", "fuzz-password-123", "fuzz-webhook-secret"
CREDENTIALS = {
    "Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(),
    "X-Webhook-Secret": SECRET,
}
SENT: Counter[str] = Counter()
STATUSES: Counter[int] = Counter()
STARTED = time.monotonic()


def make_app():
    settings = dataclasses.replace(
        Settings.from_env(), basic_auth_user=USER, basic_auth_pass=PASSWORD, webhook_secret=SECRET,
        predict_wait_seconds=0.0, max_tasks_per_request=50, max_request_bytes=256 * 1024,
    )  # fmt: skip
    return create_app(settings)


APP = make_app()
_serve = APP.wsgi_app


def _counted(environ, start_response):
    """Every request that reaches the application, the checks' own (without credentials, other methods) too."""
    SERVED[environ["REQUEST_METHOD"]] += 1
    return _serve(environ, start_response)


SERVED: Counter[str] = Counter()
APP.wsgi_app = _counted
# The document as the API serves it, and the application itself as the transport (WSGI, no network).
schema = schemathesis.openapi.from_wsgi("/openapi.json", APP, headers=CREDENTIALS)
schema.config.generation.update(max_examples=FUZZ_EXAMPLES, no_shrink=True, with_security_parameters=False)
# Invalid data must be refused with a 4xx (the API's are 400, 401, 404 and 413; never a 5xx, asserted below).
schema.config.checks.negative_data_rejection.expected_statuses = ["400", "401", "404", "405", "413", "415"]


@pytest.fixture(scope="module")
def connected_project(redis_client):
    """A clean database and one project connected as Label Studio does, so that the document's examples reach
    the real handlers (random project ids are unknown: 404)."""
    redis_client.flushdb()
    reply = APP.test_client().post("/setup", json={"project": f"{EXAMPLE_PROJECT}.1", "schema": EXAMPLE_CONFIG},
                                   headers=CREDENTIALS)  # fmt: skip
    assert reply.status_code == 200, reply.json
    yield EXAMPLE_PROJECT
    redis_client.flushdb()


@schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))  # fmt: skip
@seed(int(os.environ.get("FUZZ_SEED", "10")))
def test_the_api_answers_every_generated_request_as_its_document_says(case, connected_project):
    # A request valid by the document may still be refused (an unknown project: 404): that is the point.
    response = case.call_and_validate(headers={**(case.headers or {}), **CREDENTIALS},
                                      excluded_checks=[positive_data_acceptance])  # fmt: skip
    SENT[f"{case.method} {case.path}"] += 1
    STATUSES[response.status_code] += 1
    assert response.status_code < 500
    if response.status_code >= 400 and not (case.path == "/ui/projects/{project}" and response.status_code == 404):
        assert response.headers.get("content-type", [""])[0].startswith("application/json"), response.text[:200]


def test_every_route_is_in_the_document():
    """A route added to the application must be described in api/openapi.py (and so fuzzed)."""
    documented = set(DOCUMENT["paths"])
    for rule in APP.url_map.iter_rules():
        path = str(rule).replace("<path:filename>", "{filename}").replace("<raw>", "{project}")
        path = path.replace("<job_id>", "{job_id}")
        assert path in documented, f"{rule} is not in api/openapi.py"
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert method.lower() in DOCUMENT["paths"][path], f"{method} {rule} is not in api/openapi.py"


def test_the_fuzzer_sent_enough_requests():
    """Runs after the fuzzing above (file order): at least a few generated requests per operation, and, with
    `pytest -s`, how many were sent, per operation and per status."""
    if not SENT:
        pytest.skip("the fuzzing test did not run")
    operations = sum(len(methods) for methods in DOCUMENT["paths"].values())
    print(f"\nfuzzer: {sum(SENT.values())} generated cases, {sum(SERVED.values())} requests served (the checks' "
          f"own included) in {time.monotonic() - STARTED:.1f} s; cases by status: "
          f"{dict(sorted(STATUSES.items()))}; by operation: {dict(sorted(SENT.items()))}")  # fmt: skip
    assert sum(SENT.values()) >= 10 * operations
    assert any(200 <= status < 300 for status in STATUSES) and any(400 <= status < 500 for status in STATUSES)
