"""An OpenAI-compatible front door: GET /v1/models and POST /v1/chat/completions.

Clients written for OpenAI's chat-completions API (the official SDKs, Open
WebUI, LibreChat, Continue) use the backend as it is, with its keys, limits,
stored conversations and stop. A request runs the same turn as /api/chat and
/api/chat/stream (turns.chat); only the framing is OpenAI's.

The request's messages are the context sent upstream (the client owns it).
The new user message and the reply are stored in a session of the caller: the
one named by X-Session-Id, else the one whose stored conversation is the
request's earlier messages (store/conversations.py), else a new one holding
those earlier messages too. Errors on /v1 paths leave in OpenAI's shape,
{"error": {"message", "type", "code", "param"}}, so that the SDKs raise the
right exception class.
"""
import itertools
import json
import time
from datetime import datetime
from typing import Annotated, Any, Optional, Union

from flask import Blueprint, Response, current_app, g, request
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt

from . import store, turns
from .access import current_owner
from .db import get_db
from .errors import ApiError
from .generation import client_watcher
from .models import ChatRequest, parse_body
from .sessions import session_or_404, session_quota

bp = Blueprint("openai_api", __name__, url_prefix="/v1")

SESSION_HEADER = "X-Session-Id"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


# --- the request ----------------------------------------------------------------

class Loose(BaseModel):
    # OpenAI clients send many optional fields; those we do not act on are ignored
    # (see refuse_unsupported for the ones that would change the answer's meaning).
    model_config = ConfigDict(extra="allow")


class CompletionMessage(Loose):
    role: str
    content: Union[str, list[dict[str, Any]], None] = None


class StreamOptions(Loose):
    include_usage: StrictBool = False


def _number(value):
    # JSON numbers only: 1 is a temperature, "1" and true are not.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be a number")
    return value


class CompletionRequest(Loose):
    """OpenAI's chat-completions request, the fields this server reads."""
    model: Optional[str] = Field(default=None, description="accepted; the configured model answers")
    messages: list[CompletionMessage] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[StrictInt] = Field(default=None, ge=1)
    max_completion_tokens: Optional[StrictInt] = Field(default=None, ge=1)
    temperature: Optional[Annotated[float, BeforeValidator(_number), Field(ge=0)]] = None
    n: Optional[StrictInt] = None
    logprobs: Optional[StrictBool] = None
    top_logprobs: Optional[StrictInt] = None
    tools: Optional[list[Any]] = None
    functions: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    function_call: Optional[Any] = None
    response_format: Optional[dict[str, Any]] = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str
    param: Optional[str]


class OpenAIError(BaseModel):
    """An error on /v1 paths, in OpenAI's shape (the SDKs read it)."""
    error: ErrorDetail


def unsupported(param, what):
    return ApiError(400, "unsupported_feature", f"{what} not supported by this server.", param=param)


def bad_request(param, detail):
    return ApiError(400, "invalid_request", detail, param=param)


def refuse_unsupported(body):
    """What would change the answer's meaning and that we cannot do: a clear error each."""
    if body.tools or body.functions or body.tool_choice not in (None, "none") or body.function_call:
        param = "tools" if body.tools or body.tool_choice else "functions"
        raise unsupported(param, "Tools and function calling are")
    if body.n not in (None, 1):
        raise unsupported("n", "More than one choice (n > 1) is")
    if body.logprobs or body.top_logprobs:
        raise unsupported("logprobs", "Log probabilities are")
    if body.response_format and body.response_format.get("type") not in (None, "text"):
        raise unsupported("response_format", "Structured output (response_format) is")
    for name in ("audio", "modalities", "prediction"):
        if (body.model_extra or {}).get(name) not in (None, ["text"]):
            raise unsupported(name, f"'{name}' is")


def text_of(message, i):
    """The text of one request message: a string, or a list of text parts."""
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind in ("image_url", "image", "input_image"):
            raise unsupported(f"messages[{i}].content", "Images are")
        elif kind in ("input_audio", "file", "audio"):
            raise unsupported(f"messages[{i}].content", "Audio and files are")
        else:
            raise bad_request(f"messages[{i}].content", f"A content part of type {kind!r} is not understood.")
    return "\n".join(parts)


def context_of(body):
    """The request's messages as {"role", "content"} (developer is system), checked."""
    messages = []
    for i, m in enumerate(body.messages):
        if m.role in ("tool", "function") or (m.model_extra or {}).get("tool_calls") \
                or (m.model_extra or {}).get("function_call"):
            raise unsupported(f"messages[{i}]", "Tool calls and tool results are")
        if m.role not in ROLES:
            raise bad_request(f"messages[{i}].role", f"A message's role {m.role!r} is not one of"
                                                      f" system, developer, user, assistant.")
        messages.append({"role": ROLES[m.role], "content": text_of(m, i)})
    last = len(messages) - 1
    if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise bad_request(f"messages[{last}]", "The last message must be a user message with some text.")
    limit = current_app.config["MAX_MESSAGE_CHARS"]
    if len(messages[-1]["content"]) > limit:
        raise bad_request(f"messages[{last}].content", f"The last message is longer than {limit} characters.")
    return messages


def chat_request(session_id, body, messages):
    """The turn's request in our own terms (checked by CompletionRequest and here)."""
    cfg = current_app.config
    max_new_tokens = body.max_completion_tokens or body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    if max_new_tokens and max_new_tokens > cfg["MAX_NEW_TOKENS_LIMIT"]:
        raise bad_request(param, f"{param} must be at most {cfg['MAX_NEW_TOKENS_LIMIT']}.")
    temperature = cfg["DEFAULT_TEMPERATURE"] if body.temperature is None else float(body.temperature)
    if temperature > cfg["TEMPERATURE_LIMIT"]:
        raise bad_request("temperature", f"temperature must be at most {cfg['TEMPERATURE_LIMIT']}.")
    # OpenAI samples unless the temperature is 0.
    return ChatRequest.model_construct(session_id=session_id, message=messages[-1]["content"], regenerate=False,
                                       max_new_tokens=max_new_tokens, temperature=temperature,
                                       do_sample=temperature > 0)


# --- the session a request continues -----------------------------------------------

def pick_session(conversation, key):
    """(session id, whether it is new) for a request whose earlier messages
    (system ones left out) are `conversation`."""
    pinned = request.headers.get(SESSION_HEADER)
    if pinned:
        return session_or_404(pinned.strip())["session_id"], False
    db = get_db()
    if key is not None:
        # A retry with its Idempotency-Key belongs to the session its first try
        # started in (whose conversation has moved on since); turns.chat then
        # replays that turn.
        earlier = store.idempotent_turn(db, current_owner(), key, current_app.config["IDEMPOTENCY_TTL"])
        if earlier:
            return earlier["session_id"], False
    found = store.find_by_conversation(db, current_owner(), conversation)
    if found:
        return found, False
    first_user = next((m["content"] for m in conversation if m["role"] == "user"), None)
    now = store.now_iso()
    try:
        session = store.create_session(
            db, {}, store.make_title(first_user) if first_user else None,
            messages=[{"role": m["role"], "content": m["content"], "created_at": now, "status": "complete"}
                      for m in conversation if m["content"]],
            owner=current_owner(), max_sessions=current_app.config["MAX_SESSIONS_PER_KEY"])
    except store.SessionQuota:
        raise session_quota() from None
    return session["session_id"], True


# --- the answers -----------------------------------------------------------------

def model_name():
    return current_app.config["LLM_MODEL"] or "chatbot"


@bp.get("/models")
def models():
    return {"object": "list", "data": [{"id": model_name(), "object": "model", "created": 0,
                                        "owned_by": "chatbot"}]}


@bp.post("/chat/completions")
def chat_completions():
    body = parse_body(CompletionRequest)
    refuse_unsupported(body)
    messages = context_of(body)
    key = turns.idempotency_key(request.headers.get("Idempotency-Key"))
    session_id, new = pick_session([m for m in messages[:-1] if m["role"] != "system"], key)
    g.session_id = session_id
    try:
        events, replayed = turns.chat(chat_request(session_id, body, messages), current_owner(), key,
                                      stream=body.stream, client_gone=client_watcher(request.environ),
                                      upstream_messages=messages)
    except (ApiError, turns.TurnRefused):
        # Refused before its user message was stored (budget, limits): a new
        # session would be an unasked-for copy of the conversation.
        if new:
            store.delete_session(get_db(), session_id, current_owner())
            g.session_id = None
        raise
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    headers = {SESSION_HEADER: session_id, **({"Idempotent-Replayed": "true"} if replayed else {})}
    if not body.stream:
        return completion(turns.reply_of(events, replayed)), headers
    first = turns.first_event(events, replayed)
    return Response(sse(first, events, model_name(), include_usage, current_app.config["SSE_KEEPALIVE"]),
                    mimetype="text/event-stream",
                    headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def usage_of(message):
    usage = message["token_usage"] or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    return {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


def unix_time(iso):
    return int(datetime.fromisoformat(iso).timestamp())


def completion(message):
    return {"id": f"chatcmpl-{message['message_id']}", "object": "chat.completion",
            "created": unix_time(message["created_at"]), "model": model_name(),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": message["content"],
                                                 "refusal": None},
                         "logprobs": None, "finish_reason": message["finish_reason"]}],
            "usage": usage_of(message)}


def frame(data, position=None):
    head = f"id: {position}\n" if position is not None else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n".encode("utf-8")


def sse(first, events, model, include_usage, keepalive):
    """Frame a reply's events as OpenAI's chunks. Each text chunk's `id:` is the
    reply's length so far in code points (the engine's positions, as on
    /api/chat/stream), so our own clients can re-attach
    (GET /api/sessions/{id}/messages/{message_id}/stream)."""
    base = None
    last_write = time.monotonic()

    def chunk(delta, finish_reason=None):
        data = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                     "finish_reason": finish_reason}]}
        if include_usage:
            data["usage"] = None   # as OpenAI: null on every chunk but the last
        return data

    try:
        for kind, value, position in itertools.chain([first], events):
            if kind == "idle":
                if time.monotonic() - last_write < keepalive:
                    continue
                out = b": keep-alive\n\n"
            elif kind == "start":
                base = {"id": f"chatcmpl-{value['message_id']}", "object": "chat.completion.chunk",
                        "created": int(time.time()), "model": model}
                out = frame(chunk({"role": "assistant", "content": ""}))
            elif kind == "delta":
                out = frame(chunk({"content": value}), position)
            elif kind == "done":
                out = frame(chunk({}, value["finish_reason"]), position)
                if include_usage:
                    out += frame({**base, "choices": [], "usage": usage_of(value)})
                out += b"data: [DONE]\n\n"
            else:  # error, after the start: the SDKs raise on a chunk that carries "error"
                status = value.get("status", 502)
                out = frame({"error": {"message": value["detail"], "type": error_type(status),
                                       "code": value["code"], "param": None}}, position)
            last_write = time.monotonic()
            yield out
    finally:
        events.close()  # a client that left: the reply goes on for the grace period, or to its end


# --- errors in OpenAI's shape ---------------------------------------------------------

def error_type(status):
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


@bp.after_app_request
def openai_errors(response):
    """Every problem+json answer on a /v1 path, whoever raised it (keys, limits,
    routing, the turn), leaves as {"error": {...}}. A 422 becomes a 400, which
    is how OpenAI refuses a bad body (the SDKs raise BadRequestError)."""
    if not request.path.startswith("/v1/"):
        return response
    if g.get("session_id") and request.endpoint == "openai_api.chat_completions":
        response.headers[SESSION_HEADER] = g.session_id
    if response.mimetype != "application/problem+json":
        return response
    problem = json.loads(response.get_data())
    status = 400 if response.status_code == 422 else response.status_code
    message, param = problem["detail"], problem.get("param")
    if problem.get("errors"):
        first = problem["errors"][0]
        param = param or first["field"]
        message = f"{message} {first['field']}: {first['detail']}"
    response.set_data(json.dumps({"error": {"message": message, "type": error_type(status),
                                            "code": problem["code"], "param": param}}, ensure_ascii=False))
    response.status_code = status
    response.mimetype = "application/json"
    if status == 409:
        # The OpenAI SDKs retry a 409 twice unless told not to; a reply that is
        # still running will not be done by then, and a retry is not what the user asked.
        response.headers["x-should-retry"] = "false"
    return response
