"""GET /api/openapi.json: an OpenAPI 3.1 description of the API.

Paths and methods come from the app's URL map, schemas from the pydantic
models (chatbot/models.py) with this deployment's configured limits; only what
each endpoint takes and answers is written here, keyed by endpoint name. A
route missing from OPERATIONS is missing from the description, and the tests
fail on it; real answers are checked against the schemas by the fuzz test.
"""
import re

from flask import Blueprint, current_app
from pydantic.json_schema import models_json_schema

from .access import public
from .models import (ChatRequest, Conversation, CreateSession, ExportQuery, Health, Message, MessageList,
                     MessagesQuery, PatchSession, Problem, Session, SessionList, SessionsQuery, Stopped,
                     StreamDelta, StreamDone, StreamError, StreamStart)
from .openai_api import CompletionRequest, OpenAIError

bp = Blueprint("openapi", __name__, url_prefix="/api")


class Op:
    """What one endpoint takes and answers. `ok` is (status, model, description);
    model None means no body, "sse" an event stream, "export" a conversation
    as JSON or Markdown. `query` is the model of the query string. `errors` are
    the statuses an endpoint itself may answer; build() adds those of every
    endpoint (401 and 429 with keys; 400, 413, 415 and 422 with a body; 422
    with a query)."""

    def __init__(self, summary, ok, body=None, body_required=True, query=None, errors=(), tags=(), openai=False):
        self.summary, self.ok, self.body, self.body_required = summary, ok, body, body_required
        self.query, self.errors, self.tags = query, errors, tags
        self.openai = openai   # OpenAI's shapes (chatbot/openai_api.py): errors are OpenAIError, 422 is 400


UPSTREAM = (502, 503, 504)
OPERATIONS = {
    "sessions.create": Op("Create a session", (201, Session, "The new session"),
                          body=CreateSession, body_required=False, errors=(409,), tags=["sessions"]),
    "sessions.list_sessions": Op("The caller's sessions, most recently active first",
                                 (200, SessionList, "A page of sessions; next_cursor asks for the next"),
                                 query=SessionsQuery, errors=(400,), tags=["sessions"]),
    "sessions.get": Op("A session", (200, Session, "The session"), errors=(404,), tags=["sessions"]),
    "sessions.patch": Op("Change a session's title, metadata or system prompt", (200, Session, "The session"),
                         body=PatchSession, errors=(404,), tags=["sessions"]),
    "sessions.delete": Op("Delete a session and its messages", (204, None, "Deleted"),
                          errors=(404,), tags=["sessions"]),
    "sessions.messages": Op("A session's messages, oldest first: all, or a page before a message",
                            (200, MessageList, "The messages"), query=MessagesQuery, errors=(404,),
                            tags=["sessions"]),
    "sessions.export": Op("The whole conversation, as a download", (200, "export", "JSON or Markdown"),
                          query=ExportQuery, errors=(404,), tags=["sessions"]),
    "sessions.import_": Op("A new session holding an exported conversation", (201, Session, "The new session"),
                           body=Conversation, errors=(409,), tags=["sessions"]),
    "chat.chat": Op("One chat turn, answered as a whole", (200, Message, "The assistant's reply"),
                    body=ChatRequest, errors=(404, 409, 429) + UPSTREAM, tags=["chat"]),
    "chat.chat_stream": Op("One chat turn, streamed as Server-Sent Events",
                           (200, "sse", "Events start, delta..., then done or error, then data: [DONE]"),
                           body=ChatRequest, errors=(404, 409, 429) + UPSTREAM, tags=["chat"]),
    "chat.resume": Op("Re-attach to a reply: the text after position ?after (or Last-Event-ID), then live,"
                      " then its done or error", (200, "sse", "Events start, delta..., then done or error"),
                      errors=(400, 404), tags=["chat"]),
    "chat.stop": Op("Stop the reply being generated", (202, Stopped, "The reply is being stopped"),
                    errors=(404, 409), tags=["chat"]),
    "ws.chat_ws": Op("Chat turns over a WebSocket: JSON frames chat/stop in, start/delta/done/error out",
                     (101, None, "Switching Protocols (a plain GET without the upgrade is a 400)"),
                     errors=(400, 429), tags=["chat"]),
    "health.health": Op("Health of the database and the LLM server", (200, Health, "ok or degraded"),
                        errors=(503,), tags=["service"]),
    "openai_api.models": Op("OpenAI-compatible: the model that answers", (200, "document", "OpenAI's model list"),
                            tags=["openai"], openai=True),
    "openai_api.chat_completions": Op(
        "OpenAI-compatible chat completion, whole or streamed; the session comes back in X-Session-Id",
        (200, "completion", "OpenAI's chat.completion, or chat.completion.chunk events then [DONE]"),
        body=CompletionRequest, errors=(404, 409, 429) + UPSTREAM, tags=["openai"], openai=True),
    "openapi.openapi": Op("This description", (200, "document", "OpenAPI 3.1"), tags=["service"]),
    "metrics.metrics": Op("Prometheus metrics of every worker of this host (the metrics token, or loopback)",
                          (200, "prometheus", "Prometheus text format"), errors=(401,), tags=["service"]),
}

BODY_ERRORS = (400, 413, 415, 422)
ERROR_TEXT = {
    400: "The body is not valid JSON (invalid_json), a cursor is not one we gave (invalid_cursor), a position"
         " is no non-negative integer (invalid_position), an Idempotency-Key is malformed"
         " (invalid_idempotency_key), or a GET of the WebSocket is no upgrade (bad_request)",
    401: "No API key, or not a valid one; for /metrics, not the metrics token (unauthorized)",
    404: "No such session for this key (session_not_found), or no such message in it (message_not_found)",
    409: "A reply is being generated (generation_in_progress), none is (nothing_to_stop), there is"
         " none to regenerate (nothing_to_regenerate), or the key has as many sessions as it may"
         " (session_quota_exceeded)",
    413: "The body is too large (payload_too_large), or an import would take the key past its stored"
         " bytes (storage_quota_exceeded)",
    415: "The body is not application/json (unsupported_media_type)",
    422: "The body or query does not validate (validation_error), with the failing fields, or an"
         " Idempotency-Key was used for another request (idempotency_key_reused)",
    429: "Too many requests (rate_limited), replies at once (too_many_streams) or open WebSockets"
         " (too_many_sockets) for this key",
    502: "The LLM server answered with an error (upstream_error)",
    503: "The LLM server cannot be reached (upstream_unavailable)",
    504: "The LLM server did not answer in time (upstream_timeout)",
}
OPENAI_ERROR_TEXT = {
    400: "The body is not valid (invalid_json, validation_error, invalid_request), asks for what this server"
         " does not do (unsupported_feature), or its last message does not fit the context budget"
         " (context_length_exceeded)",
    409: "A reply is being generated in the session (generation_in_progress); x-should-retry: false",
}
HEADERS = {
    401: {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}},
    429: {"Retry-After": {"required": True, "description": "seconds", "schema": {"type": "string"}}},
}
REQUEST_MODELS = (CreateSession, PatchSession, ChatRequest, Conversation, CompletionRequest)
RESPONSE_MODELS = (Session, SessionList, Message, MessageList, Stopped, Health, Problem, StreamStart,
                   StreamDelta, StreamDone, StreamError, OpenAIError)


def _ref(model):
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _event(name, model, numbered=False):
    """One Server-Sent Event: its name, and its data as JSON of `model`."""
    properties = {"event": {"const": name},
                  "data": {"type": "string", "contentMediaType": "application/json",
                           "contentSchema": _ref(model)}}
    if numbered:
        properties["id"] = {"type": "string", "pattern": "^[0-9]+$"}
    return {"type": "object", "required": ["event", "data"], "properties": properties}


# Each event of the stream (OpenAPI 3.1: the schema of an event-stream describes one event),
# and the last line after the terminal one.
STREAM_EVENT = {"oneOf": [_event("start", StreamStart), _event("delta", StreamDelta, numbered=True),
                          _event("done", StreamDone, numbered=True), _event("error", StreamError, numbered=True),
                          {"type": "object", "required": ["data"], "properties": {"data": {"const": "[DONE]"}},
                           "description": "After done or error: the end, for clients of the original backend"}]}


def _path(rule):
    """/api/sessions/<session_id> -> /api/sessions/{session_id}"""
    return re.sub(r"<(?:[^<>:]+:)?([^<>]+)>", r"{\1}", rule)


def _responses(op, endpoint, secured):
    status, model, description = op.ok
    ok = {"description": description}
    if model == "sse":
        ok["content"] = {"text/event-stream": {"schema": STREAM_EVENT}}
    elif model == "export":
        # The document an import takes back, or Markdown to read.
        ok["content"] = {"application/json": {"schema": _ref(Conversation)},
                         "text/markdown": {"schema": {"type": "string"}}}
    elif model == "completion":
        ok["content"] = {"application/json": {"schema": {"type": "object"}},
                         "text/event-stream": {"schema": {"type": "object"}}}
    elif model == "document":
        ok["content"] = {"application/json": {"schema": {"type": "object"}}}
    elif model == "prometheus":
        ok["content"] = {"text/plain": {"schema": {"type": "string"}}}
    elif model is not None:
        ok["content"] = {"application/json": {"schema": _ref(model)}}
    responses = {str(status): ok}
    errors = (set(op.errors) | (set(BODY_ERRORS) if op.body else set()) | ({422} if op.query else set())
              | ({401, 429} if secured else set()))
    if op.openai:
        return {**responses, **{str(code): {"description": OPENAI_ERROR_TEXT.get(code, ERROR_TEXT[code]),
                                            "content": {"application/json": {"schema": _ref(OpenAIError)}},
                                            **({"headers": HEADERS[code]} if code in HEADERS else {})}
                                for code in sorted(errors - {422} | ({400} if op.body else set()))}}
    for code in sorted(errors):
        if endpoint == "health.health" and code == 503:
            responses["503"] = {"description": "The database is unusable",
                                "content": {"application/json": {"schema": _ref(Health)}}}
            continue
        responses[str(code)] = {"description": ERROR_TEXT[code],
                                "content": {"application/problem+json": {"schema": _ref(Problem)}},
                                **({"headers": HEADERS[code]} if code in HEADERS else {})}
    return responses


def _links():
    """A created session's id feeds the endpoints that take one (used by the
    fuzzer's stateful phase, and by readers)."""
    return {
        name: {"operationId": name, "parameters": {"session_id": "$response.body#/session_id"}}
        for name in ("sessions.get", "sessions.patch", "sessions.messages", "sessions.export", "chat.stop",
                     "sessions.delete")
        if name in current_app.view_functions
    }


def build():
    secured_app = current_app.config["AUTH"] != "disabled"
    paths = {}
    for rule in current_app.url_map.iter_rules():
        op = OPERATIONS.get(rule.endpoint)
        if op is None:
            continue
        view = current_app.view_functions[rule.endpoint]
        secured = secured_app and not getattr(view, "public", False)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            operation = {"operationId": rule.endpoint, "summary": op.summary, "tags": list(op.tags),
                         "responses": _responses(op, rule.endpoint, secured)}
            if not secured:
                operation["security"] = []
            names = re.findall(r"<(?:[^<>:]+:)?([^<>]+)>", rule.rule)
            parameters = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                          for n in names]
            if op.query is not None:
                schema = op.query.model_json_schema()
                parameters += [{"name": name, "in": "query", "required": name in schema.get("required", ()),
                                "schema": prop} for name, prop in schema["properties"].items()]
            if parameters:
                operation["parameters"] = parameters
            if op.body is not None:
                operation["requestBody"] = {"required": op.body_required,
                                            "content": {"application/json": {"schema": _ref(op.body)}}}
            if rule.endpoint == "sessions.create":
                operation["responses"]["201"]["links"] = _links()
            paths.setdefault(_path(rule.rule), {})[method.lower()] = operation

    _, schemas = models_json_schema(
        [(m, "validation") for m in REQUEST_MODELS] + [(m, "serialization") for m in RESPONSE_MODELS],
        ref_template="#/components/schemas/{model}")
    document = {
        "openapi": "3.1.0",
        "info": {"title": "chatbot", "version": "1",
                 "description": "A chat backend between chat clients and an LLM server. Every error is "
                                "application/problem+json with a machine-readable `code`."},
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": schemas["$defs"]},
    }
    if secured_app:
        document["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "An API key from `flask --app chatbot create-api-key NAME`"}}
        document["security"] = [{"bearer": []}]
    return document


@bp.get("/openapi.json")
@public
def openapi():
    return build()
