"""Request bodies and query strings, validated with pydantic, and the helpers that parse them."""
import json
from typing import Annotated, Any, Literal, Optional

from flask import current_app, request
from pydantic import (AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, StrictBool,
                      StringConstraints, ValidationError, field_validator, model_validator)
from pydantic_core import InitErrorDetails, PydanticCustomError

from . import context
from .errors import ApiError, validation_error

NonBlank = Annotated[str, StringConstraints(min_length=1)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Query(BaseModel):
    # Unknown query parameters (cache busters and the like) are ignored, as is usual for GET.
    model_config = ConfigDict(extra="ignore")


def _at_most(value, setting):
    limit = current_app.config[setting]
    if value is not None and value > limit:
        raise ValueError(f"must be at most {limit}")
    return value


def _field_error(model, field, message):
    """A validation error on one field, from a check that needs several fields,
    so that the 422 names the field (a model validator's own errors name none)."""
    return ValidationError.from_exception_data(
        model.__name__, [InitErrorDetails(type=PydanticCustomError("value_error", message), loc=(field,),
                                          input=None)])


def _metadata_fits(value):
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


Metadata = Annotated[dict[str, Any], AfterValidator(_metadata_fits)]
Title = Annotated[str, AfterValidator(_title_fits)]
# "" means no system prompt at all; None (null) means the configured default.
SystemPrompt = Annotated[str, AfterValidator(_system_prompt_fits)]


class CreateSession(Strict):
    metadata: Metadata = Field(default_factory=dict)
    title: Optional[Title] = None
    system_prompt: Optional[SystemPrompt] = None


class PatchSession(Strict):
    """Fields left out stay as they are. title null: back to the one made from
    the first message; system_prompt null: back to the configured default.
    metadata replaces the whole object."""
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


class ErrorInfo(Strict):
    code: str
    detail: str


class ConversationMessage(Strict):
    message_id: Optional[str] = None   # informative: an import gives new ids
    role: Literal["user", "assistant", "system"]
    content: str
    created_at: AwareDatetime
    status: Literal["complete", "incomplete", "failed"] = "complete"
    token_usage: Optional[dict[str, Any]] = None
    finish_reason: Optional[str] = None
    error: Optional[ErrorInfo] = None

    @model_validator(mode="after")
    def consistent(self):
        if self.role != "assistant" and self.status != "complete":
            raise _field_error(type(self), "status", f"a {self.role} message is always complete")
        if self.status == "failed" and self.content:
            raise _field_error(type(self), "content", "a failed reply has no content")
        return self


class ConversationSession(Strict):
    session_id: Optional[str] = None   # informative: an import makes a new session
    created_at: Optional[AwareDatetime] = None
    last_accessed: Optional[AwareDatetime] = None   # informative: importing is the latest activity
    title: Optional[Title] = None
    metadata: Metadata = Field(default_factory=dict)
    system_prompt: Optional[SystemPrompt] = None


class Conversation(Strict):
    """An exported conversation (GET /api/sessions/{id}/export), and the body of POST /api/sessions/import."""
    format: Literal["chatbot-conversation"]
    version: Literal[1]
    exported_at: Optional[AwareDatetime] = None
    session: ConversationSession
    messages: list[ConversationMessage]


class ChatRequest(Strict):
    """A new message, or regenerate: true (and no message) to replace the last reply."""
    session_id: NonBlank
    message: Optional[str] = None
    regenerate: StrictBool = False
    max_new_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0)
    do_sample: Optional[bool] = None

    # Limits come from configuration, so they are checked here rather than in Field().
    @field_validator("message")
    @classmethod
    def message_fits(cls, value):
        limit = current_app.config["MAX_MESSAGE_CHARS"]
        if value is None:
            return value
        if not value.strip():
            raise ValueError("message must not be empty")
        if len(value) > limit:
            raise ValueError(f"message is longer than {limit} characters")
        return value

    @field_validator("max_new_tokens")
    @classmethod
    def max_new_tokens_fits(cls, value):
        return _at_most(value, "MAX_NEW_TOKENS_LIMIT")

    @field_validator("temperature")
    @classmethod
    def temperature_fits(cls, value):
        return _at_most(value, "TEMPERATURE_LIMIT")

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
    data = request.get_json(silent=True)
    if data is None:
        raise ApiError(400, "invalid_json", "The request body is not valid JSON.")
    return parse(model, checked_text(data))


def checked_text(data):
    """JSON may escape half of a UTF-16 pair ("\\ud800"), which is no text at
    all: it cannot be stored or sent on. Refuse it as invalid JSON."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "invalid_json", "The JSON holds an unpaired surrogate (\\ud800-\\udfff).") from None
    return data
