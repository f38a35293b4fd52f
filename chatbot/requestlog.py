"""One JSON line per request, and the HTTP metrics, both taken when the
response is closed (after the last byte of a stream)."""
import json
import logging
import sys
import time

from flask import current_app, g, request

from . import metrics

access_log = logging.getLogger("chatbot.requests")


def start_clock():
    g.started = time.monotonic()


def log_request(response):
    """Log the request as one JSON line when the response is closed, never with
    the key or, unless LOG_CONTENT is on, with what was said; and count it."""
    if g.get("skip_request_log"):
        return response   # a WebSocket writes its own lines (chatbot/sockets.py)
    fields = {
        "method": request.method,
        "path": request.path,
        "status": response.status_code,
        "session_id": g.get("session_id") or (request.view_args or {}).get("session_id"),
        "key": g.get("key_name"),
    }
    if current_app.config["LOG_CONTENT"] and request.is_json and response.status_code != 413:
        body = request.get_json(silent=True)
        fields["message"] = body.get("message") if isinstance(body, dict) else None
    started = g.get("started", time.monotonic())
    route = request.url_rule.rule if request.url_rule is not None else None  # never the path: it holds ids

    def write():
        seconds = time.monotonic() - started
        fields["duration_ms"] = round(seconds * 1000, 1)
        access_log.info(json.dumps(fields, ensure_ascii=False))
        metrics.http_request(fields["method"], route, fields["status"], seconds)
    response.call_on_close(write)
    return response


def _setup_access_log():
    """JSON lines on stderr, on their own (not behind the root logger's prefix)."""
    access_log.setLevel(logging.INFO)
    access_log.propagate = False
    if not any(getattr(h, "chatbot_json_lines", False) for h in access_log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.chatbot_json_lines = True  # create_app runs many times in one test process
        access_log.addHandler(handler)


def init_app(app):
    """Before access.init_app: the clock starts before a key is checked."""
    _setup_access_log()
    app.before_request(start_clock)
    app.after_request(log_request)
