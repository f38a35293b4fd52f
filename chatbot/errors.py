"""Every error leaves as application/problem+json (RFC 9457) with a `code`."""
import logging
from http import HTTPStatus

from flask import current_app
from werkzeug.exceptions import HTTPException

from .store import Conflict, SessionGone, StoreBusy, StoreUnavailable

log = logging.getLogger(__name__)

# Werkzeug's HTTP errors, renamed to the contract's codes.
HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
    413: "payload_too_large", 415: "unsupported_media_type", 429: "rate_limited",
}


class ApiError(Exception):
    """An error a view raises; the handler renders it as problem+json."""

    def __init__(self, status, code, detail, errors=None, headers=None, **extra):
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail
        self.errors, self.headers, self.extra = errors, headers or {}, extra

    def body(self):
        body = {"type": "about:blank", "title": HTTPStatus(self.status).phrase,
                "status": self.status, "detail": self.detail, "code": self.code}
        if self.errors is not None:
            body["errors"] = self.errors
        return {**body, **self.extra}


def problem(error):
    response = current_app.json.response(error.body())
    response.status_code = error.status
    response.mimetype = "application/problem+json"
    response.headers.update(error.headers)
    return response


def session_not_found(session_id):
    return ApiError(404, "session_not_found", f"No session with id {session_id!r}.")


def validation_error(pydantic_error, detail="The request body is not valid."):
    errors = [
        {"field": ".".join(str(p) for p in e["loc"]) or "(body)", "detail": e["msg"]}
        for e in pydantic_error.errors()
    ]
    return ApiError(422, "validation_error", detail, errors=errors)


# The HTTP status of each refusal of chatbot/turns.py (an upstream's error carries its own).
TURN_STATUS = {
    "session_not_found": 404, "message_not_found": 404, "generation_in_progress": 409,
    "nothing_to_regenerate": 409, "nothing_to_stop": 409, "too_many_streams": 429, "validation_error": 422,
    "idempotency_key_reused": 422, "invalid_idempotency_key": 400, "invalid_position": 400,
    "context_length_exceeded": 400,
}


def refusal(e):
    """A turns.TurnRefused as an ApiError."""
    return ApiError(e.status or TURN_STATUS[e.code], e.code, e.detail, errors=e.errors, headers=e.headers,
                    **e.extra)


def init_app(app):
    from .turns import TurnRefused

    app.register_error_handler(ApiError, problem)
    app.register_error_handler(TurnRefused, lambda e: problem(refusal(e)))
    # A session deleted between a view's check and its write (views that can race
    # a delete turn it into a 404 themselves; this is the net under the others).
    app.register_error_handler(SessionGone, lambda e: problem(session_not_found(e.args[0])))

    @app.errorhandler(HTTPException)
    def http_error(e):
        headers = dict(e.get_headers())
        headers.pop("Content-Type", None)
        return problem(ApiError(e.code, HTTP_CODES.get(e.code, "http_error"), e.description,
                                headers=headers))

    @app.errorhandler(StoreBusy)
    def database_busy(e):
        log.warning("database busy: %s", e)
        return problem(ApiError(503, "database_busy", "The database is busy; try again in a moment.",
                                headers={"Retry-After": "1"}))

    @app.errorhandler(StoreUnavailable)
    def database_unavailable(e):
        log.error("database unavailable: %s", e)
        return problem(ApiError(503, "database_unavailable", "The database cannot be reached; try again later.",
                                headers={"Retry-After": "5"}))

    @app.errorhandler(Conflict)
    def conflict(e):
        log.warning("write conflict: %s", e)
        return problem(ApiError(409, "conflict", "A concurrent request changed the same data; try again."))

    @app.errorhandler(Exception)
    def unexpected(e):
        log.exception("unhandled error")
        return problem(ApiError(500, "internal_error", "An unexpected error occurred on the server."))
