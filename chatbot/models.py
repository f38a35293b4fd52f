"""Request bodies, validated with pydantic, and the helper that parses them."""
from typing import Annotated, Any, Optional

from flask import current_app, request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from .errors import ApiError, validation_error

NonBlank = Annotated[str, StringConstraints(min_length=1)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _at_most(value, setting):
    limit = current_app.config[setting]
    if value is not None and value > limit:
        raise ValueError(f"must be at most {limit}")
    return value


class CreateSession(Strict):
    metadata: dict[str, Any] = Field(default_factory=dict)


class ChatRequest(Strict):
    session_id: NonBlank
    message: str
    max_new_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0)
    do_sample: Optional[bool] = None

    # Limits come from configuration, so they are checked here rather than in Field().
    @field_validator("message")
    @classmethod
    def message_fits(cls, value):
        limit = current_app.config["MAX_MESSAGE_CHARS"]
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

    def options(self):
        """Generation options with the configured defaults filled in."""
        cfg = current_app.config
        return {
            "max_new_tokens": self.max_new_tokens or cfg["DEFAULT_MAX_NEW_TOKENS"],
            "temperature": cfg["DEFAULT_TEMPERATURE"] if self.temperature is None else self.temperature,
            "do_sample": bool(self.do_sample),
        }


def parse(model, data):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


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
    return parse(model, data)
