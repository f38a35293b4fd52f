"""Request bodies, query strings and responses as pydantic models, and the
helpers that parse requests. The OpenAPI description (chatbot/openapi.py) is
generated from these models, so what is documented is what is validated."""
import json
from datetime import datetime
from typing import Annotated, Any, Literal, Optional

from flask import current_app, has_app_context, request
from werkzeug.exceptions import RequestEntityTooLarge
from pydantic import (AfterValidator, AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool,
                      StrictFloat, StrictInt, StringConstraints, ValidationError, field_validator,
                      model_validator)
from pydantic_core import InitErrorDetails, PydanticCustomError, core_schema

from . import context
from .errors import ApiError, validation_error

NonBlank = Annotated[str, StringConstraints(min_length=1)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Query(BaseModel):
    # Unknown query parameters (cache busters and the like) are ignored, as is usual for GET.
    model_config = ConfigDict(extra="ignore")


class FromConfig:
    """A limit read from configuration (`setting`), written into the OpenAPI
    schema as `keyword` (or in words), so each deployment describes its own
    limits. It only describes: the field's validator checks."""

    def __init__(self, setting, keyword=None, words="at most {limit}"):
        self.setting, self.keyword, self.words = setting, keyword, words

    def __get_pydantic_json_schema__(self, schema, handler):
        json_schema = handler(schema)
        if has_app_context():   # the description is made inside a request
            limit = current_app.config[self.setting]
            if self.keyword:
                json_schema[self.keyword] = limit
            else:
                json_schema["description"] = self.words.format(limit=limit)
        return json_schema


class AtMost(FromConfig):
    """A FromConfig upper bound that is also checked. `measure` sizes the value."""

    def __init__(self, setting, keyword="maximum", measure=None, too_big="must be at most {limit}"):
        super().__init__(setting, keyword)
        self.too_big = too_big
        self.measure = measure or (lambda value: value)

    def __get_pydantic_core_schema__(self, source, handler):
        return core_schema.no_info_after_validator_function(self.check, handler(source))

    def check(self, value):
        limit = current_app.config[self.setting]
        if self.measure(value) > limit:
            raise ValueError(self.too_big.format(limit=limit))
        return value


def _whole(value):
    # JSON Schema counts 2.0 as an integer; a strict int would not.
    return int(value) if isinstance(value, float) and value.is_integer() else value


# Some non-blank text: the schema says so with a pattern, the validators in words.
NOT_BLANK = {"pattern": r"\S"}


def _field_error(model, field, message):
    """A validation error on one field (a name, or a path as a tuple), from a
    check that needs several fields, so that the 422 names the field (a model
    validator's own errors name none)."""
    loc = field if isinstance(field, tuple) else (field,)
    return ValidationError.from_exception_data(
        model.__name__, [InitErrorDetails(type=PydanticCustomError("value_error", message), loc=loc,
                                          input=None)])


METADATA_MAX_DEPTH = 32   # levels of nested objects and arrays in metadata


def _depth(value, limit):
    """How deeply `value` nests (1 for a flat object), counted no further than
    limit + 1, without recursion: a deep value must not overflow the stack here either."""
    depth, level = 0, [value]
    while level and depth <= limit:
        depth += 1
        level = [child for v in level for child in (v.values() if isinstance(v, dict) else v)
                 if isinstance(child, (dict, list))]
    return depth


def _metadata_fits(value):
    if _depth(value, METADATA_MAX_DEPTH) > METADATA_MAX_DEPTH:
        # Deeper values pass the parser but may not pass every serialiser after it.
        raise ValueError(f"metadata is nested deeper than {METADATA_MAX_DEPTH} levels")
    limit = current_app.config["METADATA_MAX_BYTES"]
    size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    if size > limit:
        raise ValueError(f"metadata is {size} bytes of JSON; at most {limit} are allowed")
    return value


def _title_fits(value):
    value = " ".join(value.split())
    limit = current_app.config["TITLE_MAX_CHARS"]
    if not value:
        raise ValueError("title must not be blank")
    if len(value) > limit:
        raise ValueError(f"title is longer than {limit} characters")
    return value


def _system_prompt_fits(value):
    limit, budget = current_app.config["SYSTEM_PROMPT_MAX_CHARS"], current_app.config["CONTEXT_MAX_TOKENS"]
    if len(value) > limit:
        raise ValueError(f"system_prompt is longer than {limit} characters")
    if not context.fits(value, "", budget):
        raise ValueError(f"system_prompt leaves no room for a message in the context budget of {budget} tokens")
    return value


Metadata = Annotated[dict[str, Any], AfterValidator(_metadata_fits),
                     FromConfig("METADATA_MAX_BYTES", words="At most {limit} bytes of compact UTF-8 JSON.")]
Title = Annotated[str, AfterValidator(_title_fits), Field(json_schema_extra=NOT_BLANK),
                  FromConfig("TITLE_MAX_CHARS", words="At most {limit} characters, runs of spaces counted as one.")]
# "" means no system prompt at all; None (null) means the configured default.
SystemPrompt = Annotated[str, AfterValidator(_system_prompt_fits), FromConfig("SYSTEM_PROMPT_MAX_CHARS", "maxLength")]
# A user message: bounded in length (checked here) and not blank (ChatRequest checks).
MessageText = Annotated[str, Field(json_schema_extra=NOT_BLANK),
                        AtMost("MAX_MESSAGE_CHARS", "maxLength", len,
                               too_big="message is longer than {limit} characters")]


class CreateSession(Strict):
    metadata: Metadata = Field(default_factory=dict)
    title: Optional[Title] = None
    system_prompt: Optional[SystemPrompt] = None


class PatchSession(Strict):
    """Fields left out stay as they are. title null: back to the one made from
    the first message; system_prompt null: back to the configured default.
    metadata replaces the whole object."""
    model_config = ConfigDict(json_schema_extra={"minProperties": 1})   # not_empty(), described
    title: Optional[Title] = None
    metadata: Metadata = None
    system_prompt: Optional[SystemPrompt] = None

    @model_validator(mode="after")
    def not_empty(self):
        if not self.model_fields_set:
            raise ValueError("send at least one of title, metadata, system_prompt")
        return self

    def changes(self):
        return self.model_dump(include=self.model_fields_set)


class SessionsQuery(Query):
    limit: int = Field(default=20, ge=1)
    cursor: Optional[str] = None

    @field_validator("limit")
    @classmethod
    def capped(cls, value):
        return min(value, current_app.config["SESSIONS_PAGE_LIMIT"])


class MessagesQuery(Query):
    """No parameters: the whole history. limit and/or before: one page."""
    limit: Optional[int] = Field(default=None, ge=1)
    before: Optional[str] = None

    @field_validator("limit")
    @classmethod
    def capped(cls, value):
        return value and min(value, current_app.config["MESSAGES_PAGE_LIMIT"])


class ExportQuery(Query):
    format: Literal["json", "markdown"] = "json"


# A token count: no model counts past 2**31 tokens in one reply, and stored numbers stay in range.
Count = Annotated[StrictInt, Field(ge=0, le=2**31 - 1), BeforeValidator(_whole)]
# Short machine words (a finish reason, an error code) and an error's sentence, as an import may carry them.
Word = Annotated[str, StringConstraints(max_length=64)]
Sentence = Annotated[str, StringConstraints(max_length=2000)]
REPLY_CHARS_PER_MESSAGE_CHARS = 4   # an imported reply may be this many times MAX_MESSAGE_CHARS long


def _text(value):
    if not isinstance(value, str):   # pydantic would take 0 for 1970-01-01
        raise ValueError("must be an ISO 8601 date and time with its offset, as a string")
    return value


Timestamp = Annotated[AwareDatetime, BeforeValidator(_text)]


class TokenUsage(Strict):
    # Strict: the service stores exactly these fields (llm.token_usage), so an
    # import may carry nothing else.
    prompt_tokens: Count
    completion_tokens: Count
    total_tokens: Count
    estimated: Optional[StrictBool] = Field(default=None, description="true when counted by us, not the LLM server")
    estimated_fields: Optional[list[Literal["prompt_tokens", "completion_tokens", "total_tokens"]]] = Field(
        default=None, description="the counts made by us when the LLM server gave only some"
                                  " (midm_LLM_serving counts the completion alone)")


class ErrorInfo(Strict):
    code: Word
    detail: Sentence


def _content_limits():
    """The most characters of a message's content, by role."""
    cfg = current_app.config
    return {"user": cfg["MAX_MESSAGE_CHARS"], "assistant": cfg["MAX_MESSAGE_CHARS"] * REPLY_CHARS_PER_MESSAGE_CHARS,
            "system": cfg["SYSTEM_PROMPT_MAX_CHARS"]}


def _role_is(role):
    return {"required": ["role"], "properties": {"role": {"const": role}}}


def _describe_message(schema):
    """The checks of ConversationMessage.consistent(), for the OpenAPI description."""
    schema["allOf"] = [
        {"if": {"required": ["role"], "properties": {"role": {"enum": ["user", "system"]}}},
         "then": {"properties": {"status": {"const": "complete"}}}},
        {"if": _role_is("user"), "then": {"properties": {"content": NOT_BLANK}}},
        {"if": {"required": ["status"], "properties": {"status": {"const": "failed"}}},
         "then": {"properties": {"content": {"maxLength": 0}}}},
    ]
    if has_app_context():   # this deployment's limits
        schema["allOf"] += [{"if": _role_is(role), "then": {"properties": {"content": {"maxLength": limit}}}}
                            for role, limit in _content_limits().items()]


def _describe_conversation(schema):
    """The checks of Conversation.system_message_first(), for the OpenAPI description."""
    not_system = {"not": _role_is("system")}
    schema["allOf"] = [
        {"properties": {"messages": {"prefixItems": [True], "items": not_system}}},
        {"if": {"required": ["session"], "properties": {"session": {
            "required": ["system_prompt"], "properties": {"system_prompt": {"type": "string"}}}}},
         "then": {"properties": {"messages": {"items": not_system}}}},
    ]


class ConversationMessage(Strict):
    model_config = ConfigDict(json_schema_extra=_describe_message)

    message_id: Optional[str] = None   # informative: an import gives new ids
    role: Literal["user", "assistant", "system"]
    content: str
    created_at: Timestamp
    status: Literal["complete", "incomplete", "failed"] = "complete"
    token_usage: Optional[TokenUsage] = None
    finish_reason: Optional[Word] = None
    error: Optional[ErrorInfo] = None

    @model_validator(mode="after")
    def consistent(self):
        limit = _content_limits()[self.role]
        if len(self.content) > limit:
            # The chat's own limits: an import is no way round them.
            raise _field_error(type(self), "content", f"a {self.role} message is at most {limit} characters")
        if self.role != "assistant" and self.status != "complete":
            raise _field_error(type(self), "status", f"a {self.role} message is always complete")
        if self.role == "user" and not self.content.strip():
            # As POST /api/chat: a blank one would leave a regenerate nothing to answer.
            raise _field_error(type(self), "content", "a user message is not blank")
        if self.status == "failed" and self.content:
            raise _field_error(type(self), "content", "a failed reply has no content")
        return self


class ConversationSession(Strict):
    session_id: Optional[str] = None   # informative: an import makes a new session
    created_at: Optional[Timestamp] = None
    last_accessed: Optional[Timestamp] = None   # informative: importing is the latest activity
    title: Optional[Title] = None
    metadata: Metadata = Field(default_factory=dict)
    system_prompt: Optional[SystemPrompt] = None


class Conversation(Strict):
    """An exported conversation (GET /api/sessions/{id}/export), and the body of POST /api/sessions/import."""
    model_config = ConfigDict(json_schema_extra=_describe_conversation)
    format: Literal["chatbot-conversation"]
    version: Literal[1]
    exported_at: Optional[Timestamp] = None
    session: ConversationSession
    messages: list[ConversationMessage]

    @model_validator(mode="after")
    def system_message_first(self):
        """Stored history holds user messages and replies only. A system message
        may come first, as the session's system prompt (what an export of
        another service may hold); anywhere else it would pose as the
        operator's words in the middle of a conversation."""
        for i, m in enumerate(self.messages):
            if m.role == "system" and (i > 0 or self.session.system_prompt is not None):
                raise _field_error(type(self), ("messages", i, "role"),
                                   "a system message may only be the first message, and only when"
                                   " session.system_prompt is not given: it becomes the session's system prompt")
        if self.messages and self.messages[0].role == "system":
            try:
                _system_prompt_fits(self.messages[0].content)
            except ValueError as e:
                raise _field_error(type(self), ("messages", 0, "content"), str(e)) from None
        return self

    def system_prompt(self):
        """The session's system prompt: the session's own, or a first system message."""
        if self.messages and self.messages[0].role == "system":
            return self.messages[0].content
        return self.session.system_prompt

    def history(self):
        return [m for m in self.messages if m.role != "system"]


class ChatRequest(Strict):
    """A new message, or regenerate: true (and no message) to replace the last reply."""
    # message_or_regenerate(), for the OpenAPI description.
    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["message"], "properties": {"message": {"type": "string"}, "regenerate": {"const": False}}},
        {"required": ["regenerate"], "properties": {"message": {"type": "null"}, "regenerate": {"const": True}}},
    ]})
    session_id: NonBlank
    message: Optional[MessageText] = None
    regenerate: StrictBool = False
    # Strict: "64" is not a number, nor 1 a boolean. Limits come from configuration (AtMost).
    max_new_tokens: Optional[Annotated[StrictInt, Field(ge=1), BeforeValidator(_whole),
                                       AtMost("MAX_NEW_TOKENS_LIMIT")]] = None
    temperature: Optional[Annotated[StrictFloat, Field(ge=0.0), AtMost("TEMPERATURE_LIMIT")]] = None
    do_sample: Optional[StrictBool] = None
    # "continue": the reply is generated to its end whoever listens (its client may re-attach later).
    on_disconnect: Literal["stop", "continue"] = "stop"
    # Sent by clients of the original backend, which offered retrieval (RAG): accepted, ignored.
    use_rag: Annotated[StrictBool, Field(json_schema_extra={"const": False},
                                         description="Only false: retrieval is not part of this service.")] = False
    top_k: Optional[Annotated[StrictInt, Field(ge=0, description="Ignored (retrieval is not part of this"
                                                                " service)."), BeforeValidator(_whole)]] = None

    @field_validator("use_rag")
    @classmethod
    def no_retrieval(cls, value):
        if value:
            raise ValueError("retrieval (RAG) is not part of this service; send use_rag false or leave it out")
        return value

    @field_validator("message")
    @classmethod
    def message_not_blank(cls, value):
        if value is not None and not value.strip():
            raise ValueError("message must not be empty")
        return value

    @model_validator(mode="after")
    def message_or_regenerate(self):
        if self.regenerate and self.message is not None:
            raise _field_error(type(self), "regenerate", "send either a message or regenerate, not both")
        if not self.regenerate and self.message is None:
            raise _field_error(type(self), "message", "a message is required unless regenerate is true")
        return self

    def options(self):
        """Generation options with the configured defaults filled in."""
        cfg = current_app.config
        return {
            "max_new_tokens": self.max_new_tokens or cfg["DEFAULT_MAX_NEW_TOKENS"],
            "temperature": cfg["DEFAULT_TEMPERATURE"] if self.temperature is None else self.temperature,
            "do_sample": bool(self.do_sample),
        }


def parse(model, data, detail="The request body is not valid."):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e, detail) from None


def parse_query(model):
    """Validate the query string against `model` (422 naming the parameter)."""
    return parse(model, request.args.to_dict(), "The query parameters are not valid.")


def parse_body(model, optional=False):
    """Validate the request's JSON body against `model`.

    415 for a body that is not JSON, 400 for JSON that does not parse, 422 for
    a body of the wrong shape. With optional=True an empty body means {}.
    """
    if optional and not request.content_length and not request.is_json:
        return parse(model, {})
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", "Send the body as application/json.")
    body_within_limit()
    try:
        data = request.get_json(silent=True)
    except RecursionError:  # nested deeper than the json module can parse
        data = None
    if data is None:
        raise ApiError(400, "invalid_json", "The request body is not valid JSON.")
    return parse(model, checked_text(data))


def body_within_limit():
    """413 for a body over the limit, chunked as well as sized. werkzeug
    checks a Content-Length before reading, but stops reading a chunked body
    at the limit and hands on what it read: a cut body, silently."""
    data = request.get_data(cache=True)
    limit = request.max_content_length
    if request.content_length is None and limit is not None and len(data) >= limit:
        if request.environ["wsgi.input"].read(1):   # the byte after the limit (werkzeug read up to it)
            raise RequestEntityTooLarge()


def checked_text(data):
    """Refuse, as invalid JSON, what the parser takes but no strict JSON
    reader would: half of a UTF-16 pair ("\\ud800", which is no text at all:
    it cannot be stored or sent on), and NaN or Infinity (not JSON: clients
    that read them back would fail)."""
    try:
        json.dumps(data, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "invalid_json", "The JSON holds an unpaired surrogate (\\ud800-\\udfff).") from None
    except ValueError:
        raise ApiError(400, "invalid_json", "The JSON holds NaN or Infinity, which JSON does not have.") from None
    except RecursionError:
        raise ApiError(400, "invalid_json", "The JSON is nested too deep.") from None
    return data


# --- responses (for the OpenAPI description; the fuzz test checks real answers against them) ---

class Session(BaseModel):
    session_id: str
    created_at: datetime
    last_accessed: datetime
    title: Optional[str]
    metadata: dict[str, Any]
    system_prompt: Optional[str] = Field(description="null: the configured default")
    message_count: int


class SessionList(BaseModel):
    sessions: list[Session]
    next_cursor: Optional[str]


class Message(BaseModel):
    message_id: str
    session_id: str
    role: Literal["user", "assistant", "system"]
    content: str
    created_at: datetime
    status: Literal["complete", "incomplete", "failed"]
    token_usage: Optional[TokenUsage]
    finish_reason: Optional[str]
    error: Optional[ErrorInfo]


# Each event's `type` is the original backend's name for it, for clients
# written for that backend (they read only the `data:` lines, up to `data: [DONE]`).

class StreamStart(BaseModel):
    type: Literal["start"]
    session_id: str
    user_message_id: str
    message_id: str


class StreamDelta(BaseModel):
    type: Literal["token"]
    content: str


class StreamDone(Message):
    """The stored reply, with the event's type."""
    type: Literal["complete"]


class StreamError(BaseModel):
    type: Literal["error"]
    code: str
    detail: str
    message: str = Field(description="the detail again, under the original backend's name")
    message_id: str


class MessageList(BaseModel):
    session_id: str
    messages: list[Message]
    has_more: bool
    total_count: int = Field(description="all messages of the session, whatever the page")


class Stopped(BaseModel):
    stopped: Literal[True]


class Health(BaseModel):
    status: Literal["ok", "degraded", "unavailable"]
    database: dict[str, Any]
    llm: dict[str, Any]
    auth: Literal["required", "disabled"]
    # The original backend's fields, for its clients.
    llm_server_available: bool = Field(description="llm.ok")
    database_connected: bool = Field(description="database.ok")
    timestamp: datetime = Field(description="when this check ran")


class FieldError(BaseModel):
    field: str
    detail: str


class Problem(BaseModel):
    """RFC 9457 problem details, with our machine-readable `code`."""
    model_config = ConfigDict(extra="allow")
    type: str
    title: str
    status: int
    detail: str
    code: str
    errors: Optional[list[FieldError]] = Field(default=None, description="each failing field of a 422")
