"""`GET /openapi.json`: an OpenAPI 3.0 description of every route of the API, written by hand.

It is what Label Studio relies on (README "API", /work/shared/docs/label-studio-contract.md) and what
tests/test_fuzz_api.py fuzzes the real application with (schemathesis): every answer must be one this
document lists, with its status, media type and shape. tests/test_fuzz_api.py also checks that every route
of the application is described here, so a new route must be added below.

Request bodies are described loosely where Label Studio sends more than the backend reads (tasks, projects,
annotations): the backend takes what it needs and refuses, with a JSON 4xx, what it cannot use.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from common.label_config import MAX_CONFIG_BYTES

bp = Blueprint("openapi", __name__)

EXAMPLE_PROJECT = 3
EXAMPLE_CONFIG = (
    '<View><Image name="image" value="$image"/><Choices name="organism_type" toName="image">'
    '<Choice value="Plankton"/><Choice value="Debris"/></Choices></View>'
)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): {"$ref": f"#/components/responses/{ERROR_RESPONSES[code]}"} for code in codes}


ERROR_RESPONSES = {
    400: "BadRequest",
    401: "Unauthorized",
    404: "NotFound",
    413: "TooLarge",
    503: "RedisUnavailable",
}
BASIC = [{"basicAuth": []}]
# /webhook: the secret header, or the basic auth (README "Security").
WEBHOOK_AUTH = [{"webhookSecret": []}, {"basicAuth": []}]
PROJECT_PARAM = {
    "name": "project",
    "in": "path",
    "required": True,
    "description": "a Label Studio project id",
    "schema": {"type": "string"},
    "example": str(EXAMPLE_PROJECT),
}

# A project as Label Studio names it: "<id>.<created-unix-ts>", a number, or an object with `id`.
PROJECT_REF = {
    "anyOf": [
        {"type": "string", "example": f"{EXAMPLE_PROJECT}.1700000000"},
        {"type": "integer"},
        {
            "type": "object",
            "required": ["id"],
            "properties": {"id": {"anyOf": [{"type": "integer"}, {"type": "string"}]}, "label_config": {}},
        },
    ]
}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}},
    },
    "Health": {
        "type": "object",
        "required": ["status", "model_class", "embedding_space"],
        "properties": {
            "status": {"type": "string", "enum": ["UP"]},
            "model_class": {"type": "string"},
            "embedding_space": {"type": "string"},
        },
    },
    "Task": {
        "type": "object",
        "required": ["id"],
        "properties": {
            "id": {"type": "integer", "minimum": 1},
            "data": {"type": "object", "example": {"image": "https://example.org/particle.png"}},
        },
    },
    "Prediction": {
        "type": "object",
        "required": ["result"],
        "properties": {
            "result": {"type": "array", "items": {"type": "object"}},
            "score": {"type": "number"},
            "model_version": {"type": "string"},
        },
    },
    "Job": {
        "type": "object",
        "required": ["id", "state", "kind", "project", "total", "done", "failed", "errors"],
        "properties": {
            "id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
            "state": {"type": "string", "enum": ["queued", "running", "done"]},
            "kind": {"type": "string"},
            "project": {"type": "integer"},
            "total": {"type": "integer"},
            "done": {"type": "integer"},
            "failed": {"type": "integer"},
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["task", "error"],
                    "properties": {"task": {"type": "integer"}, "error": {"type": "string"}},
                },
            },
        },
    },
    "Queued": {
        "type": "object",
        "required": ["status", "job"],
        "properties": {"status": {"type": "string"}, "job": {"type": "string"}},
    },
    "ProjectStatus": {
        "type": "object",
        "required": [
            "project",
            "model_version",
            "versions",
            "tasks",
            "outbox",
            "last_sync",
            "failures",
            "failure_reasons",
        ],
        "properties": {
            "project": {"type": "integer"},
            "model_version": {"type": "string"},
            "versions": {"type": "integer"},
            "tasks": {"type": "object", "additionalProperties": {"type": "integer"}},
            "outbox": {"type": "integer"},
            "last_sync": {"type": "object", "nullable": True},
            "failures": {"type": "array", "items": {"type": "object"}},
            "failure_reasons": {"type": "array", "items": {"type": "object"}},
        },
    },  # fmt: skip
    "Webhook": {
        "type": "object",
        "description": "an action that is not handled is acknowledged (`ignored`) without reading the rest",
        "required": ["action"],
        "properties": {
            "action": {
                "type": "string",
                "description": "handled: TASKS_CREATED, TASKS_DELETED, ANNOTATION_CREATED, ANNOTATION_UPDATED, "
                "ANNOTATIONS_CREATED, ANNOTATIONS_DELETED, START_TRAINING, PROJECT_UPDATED; others are ignored",
                "example": "START_TRAINING",
            },
            "project": {"description": "the project (an object with `id`): required by the handled actions"},
            # What each handled action requires is checked by its handler (a JSON 400); an action that is not
            # handled is acknowledged whatever else it carries.
            "tasks": {"description": "TASKS_CREATED, TASKS_DELETED: a list of tasks (objects with an integer `id`)"},
            "task": {"description": "ANNOTATION(S)_*: the task, or a list of them"},
            "annotation": {"description": "ANNOTATION(S)_*: the annotation, or a list of them"},
            "annotations": {"description": "ANNOTATIONS_DELETED: a list of objects with an integer `id`"},
        },
    },
    "WebhookReply": {
        "type": "object",
        "required": ["action", "status"],
        "properties": {"action": {"type": "string"}, "status": {"type": "string"}},
    },
}

RESPONSES: dict[str, Any] = {
    "BadRequest": _json(_ref("Error"), "the request is malformed: what is wrong, in `error`"),
    "Unauthorized": _json(_ref("Error"), "missing or wrong credentials (basic auth; on /webhook, or the secret)"),
    "NotFound": _json(_ref("Error"), "no such project (never connected through /setup), job or file"),
    "TooLarge": _json(
        _ref("Error"),
        "a body over MAX_REQUEST_BYTES, or more tasks than MAX_TASKS_PER_REQUEST (in TASKS_CREATED, only "
        "without LABEL_STUDIO_URL: with it, the rest of the import is listed by a sync)",
    ),
    "RedisUnavailable": _json(_ref("Error"), "Redis is away: try again"),
}


def _post(summary: str, body: dict[str, Any], ok: dict[str, Any], errors: tuple[int, ...], *, security=BASIC,
          example: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    media: dict[str, Any] = {"schema": body}
    if example is not None:
        media["example"] = example
    return {
        "post": {
            "summary": summary,
            "security": security,
            "requestBody": {"required": True, "content": {"application/json": media}},
            "responses": {**ok, **_errors(*errors)},
        }
    }


def _get(summary: str, ok: dict[str, Any], errors: tuple[int, ...], *, parameters: list | None = None,
         security: list | None = BASIC) -> dict[str, Any]:  # fmt: skip
    operation: dict[str, Any] = {"summary": summary, "responses": {**ok, **_errors(*errors)}}
    if security is not None:
        operation["security"] = security
    if parameters:
        operation["parameters"] = parameters
    return {"get": operation}


HTML = {"text/html": {"schema": {"type": "string"}}}


def _static_files(summary: str, example: str) -> dict[str, Any]:
    text = {"text/javascript": {"schema": {"type": "string"}}, "text/css": {"schema": {"type": "string"}}}
    return _get(
        summary,
        {"200": {"description": "the file", "content": text}},
        (401, 404),
        parameters=[{"name": "filename", "in": "path", "required": True, "schema": {"type": "string"},
                     "example": example}],
    )  # fmt: skip


PATHS: dict[str, Any] = {
    "/": _get("the same as /health", {"200": _json(_ref("Health"), "up")}, (), security=[]),
    "/health": _get(
        "liveness, in milliseconds, without Redis; open to all (healthchecks, Label Studio)",
        {"200": _json(_ref("Health"), "up")},
        (),
        security=[],
    ),  # fmt: skip
    "/setup": _post(
        "Label Studio connecting the backend to a project; the only call that makes a project known (the first "
        "time with its label config, `schema`)",
        {
            "type": "object",
            "required": ["project"],
            "properties": {
                "project": PROJECT_REF,
                "schema": {
                    "type": "string",
                    "nullable": True,
                    "maxLength": MAX_CONFIG_BYTES,
                    "description": "the label config (required the first time)",
                },
                "hostname": {"description": "not read"},
                "access_token": {"description": "not read: the workers use LABEL_STUDIO_API_KEY"},
                "extra_params": {
                    "description": '`{"model_scope": "project" | "bucket"}`, or that as JSON text; '
                    "anything else is ignored"
                },
            },
        },  # fmt: skip
        {
            "200": _json(
                {"type": "object", "required": ["model_version"], "properties": {"model_version": {"type": "string"}}},
                "the project's current model version",
            )
        },
        (400, 401, 413, 503),
        example={"project": f"{EXAMPLE_PROJECT}.1700000000", "schema": EXAMPLE_CONFIG},
    ),  # fmt: skip
    "/predict": _post(
        "one entry per task: a stored prediction, or [] (queued; written back to Label Studio later)",
        {
            "type": "object",
            "required": ["tasks"],
            "properties": {
                "tasks": {"type": "array", "items": _ref("Task")},
                "project": PROJECT_REF,
                "label_config": {"type": "string", "nullable": True},
                "params": {"description": "Label Studio's login, password and context: not read"},
            },
        },
        {
            "200": _json(
                {
                    "type": "object",
                    "required": ["results"],
                    "properties": {
                        "results": {
                            "type": "array",
                            "items": {"anyOf": [{"type": "array", "maxItems": 0}, _ref("Prediction")]},
                        },
                        "model_version": {"type": "string"},
                    },
                },
                "the tasks' predictions, in order",
            )
        },
        (400, 401, 404, 413, 503),
        example={"project": f"{EXAMPLE_PROJECT}.1700000000", "tasks": [{"id": 1, "data": {"image": "x.png"}}]},
    ),  # fmt: skip
    "/webhook": _post(
        "Label Studio's webhooks (and Start training): recorded and queued in milliseconds",
        _ref("Webhook"),
        {"200": _json(_ref("WebhookReply"), "recorded, queued or ignored")},
        (400, 401, 404, 413, 503),
        security=WEBHOOK_AUTH,
        example={"action": "START_TRAINING", "project": {"id": EXAMPLE_PROJECT}},
    ),
    "/train": _post(
        "what START_TRAINING does (older Label Studio): a sync, then a refit",
        {"type": "object", "required": ["project"], "properties": {"project": PROJECT_REF}},
        {"201": _json(_ref("Queued"), "the sync is queued")},
        (400, 401, 404, 413, 503),
        example={"project": EXAMPLE_PROJECT},
    ),
    "/sync": _post(
        "reconcile the project with Label Studio now (what the periodic sweep does)",
        {
            "type": "object",
            "required": ["project"],
            "properties": {"project": PROJECT_REF, "retrain": {"type": "boolean", "default": False}},
        },
        {"202": _json(_ref("Queued"), "the sync is queued")},
        (400, 401, 404, 413, 503),
        example={"project": EXAMPLE_PROJECT, "retrain": False},
    ),  # fmt: skip
    "/versions": _get(
        "model versions: of one project (`?project=`), or of every project",
        {
            "200": _json(
                {
                    "type": "object",
                    "required": ["versions", "projects"],
                    "properties": {
                        "versions": {"type": "array", "items": {"type": "string"}},
                        "projects": {
                            "type": "object",
                            "additionalProperties": {"type": "array", "items": {"type": "object"}},
                        },
                    },
                },
                "the versions",
            )
        },
        (400, 401, 503),
        parameters=[{"name": "project", "in": "query", "required": False, "schema": {"type": "string"}}],
    ),  # fmt: skip
    "/jobs/{job_id}": _get(
        "a job's state, counts, and each failure's reason",
        {"200": _json(_ref("Job"), "the job")},
        (401, 404, 503),
        parameters=[
            {
                "name": "job_id",
                "in": "path",
                "required": True,
                "schema": {"type": "string"},
                "description": "32 hexadecimal digits",
            }
        ],
    ),  # fmt: skip
    "/projects": _get(
        "the projects this backend knows",
        {
            "200": _json(
                {
                    "type": "object",
                    "required": ["projects"],
                    "properties": {"projects": {"type": "array", "items": {"type": "integer"}}},
                },
                "their ids",
            )
        },
        (401, 503),
    ),  # fmt: skip
    "/projects/{project}": _get(
        "where a project stands: tasks, failures and their reasons, outbox, last sync",
        {"200": _json(_ref("ProjectStatus"), "its status")},
        (400, 401, 404, 503),
        parameters=[PROJECT_PARAM],
    ),
    "/metrics": _get(
        'Prometheus metrics (README "Metrics")',
        {"200": {"description": "the exposition format", "content": {"text/plain": {"schema": {"type": "string"}}}}},
        (401, 503),
    ),
    "/openapi.json": _get(
        "this document",
        {"200": _json({"type": "object", "required": ["openapi", "paths"]}, "OpenAPI 3.0")},
        (401,),
    ),
    "/ui/": _get(
        "the status page: every project (HTML)", {"200": {"description": "a page", "content": HTML}}, (401, 503)
    ),  # fmt: skip
    "/ui/projects/{project}": _get(
        "the status page of one project (HTML)",
        {
            "200": {"description": "a page", "content": HTML},
            "404": {"description": "a page saying there is no such project (for browsers)", "content": HTML},
        },
        (400, 401, 503),
        parameters=[PROJECT_PARAM],
    ),  # fmt: skip
    "/ui/projects/{project}/map.json": {
        **_get(
            "the project's embedding map, as a worker stored it (gzip-compressed when accepted)",
            {"200": _json({"type": "object"}, "the map"), "304": {"description": "not modified (ETag)"}},
            (400, 401, 404, 503),
            parameters=[PROJECT_PARAM],
        ),
    },  # fmt: skip
    "/ui/projects/{project}/map": _post(
        "queue a new embedding map (a JSON body, so that no plain cross-site form can)",
        {"type": "object"},
        {
            "202": _json(
                {
                    "type": "object",
                    "required": ["project", "queued"],
                    "properties": {"project": {"type": "integer"}, "queued": {"type": "boolean"}},
                },
                "queued",
            )
        },
        (400, 401, 404, 413, 503),
        example={},
    ),  # fmt: skip
    "/ui/static/{filename}": _static_files("the status page's script and stylesheet", "status.js"),
    "/static/{filename}": _static_files("the same files (Flask's own static route for api/static)", "status.css"),
}
PATHS["/ui/projects/{project}/map"]["post"]["parameters"] = [PROJECT_PARAM]

DOCUMENT: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "Plankton ML backend for Label Studio",
        "version": "1",
        "description": "The routes Label Studio calls (/health, /setup, /predict, /webhook, /versions, /train) and "
        'the operator\'s (/sync, /projects, /jobs, /metrics, /ui). Every error is JSON `{"error": ...}` but the '
        'status page\'s 404 (HTML, for browsers). See the README\'s "API" and "Security".',
    },
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "responses": RESPONSES,
        "securitySchemes": {
            "basicAuth": {
                "type": "http",
                "scheme": "basic",
                "description": "BASIC_AUTH_USER / BASIC_AUTH_PASS, when set",
            },
            "webhookSecret": {
                "type": "apiKey",
                "in": "header",
                "name": "X-Webhook-Secret",
                "description": "WEBHOOK_SECRET, when set",
            },
        },  # fmt: skip
    },
}


@bp.get("/openapi.json")
def openapi_document():
    return jsonify(DOCUMENT)
