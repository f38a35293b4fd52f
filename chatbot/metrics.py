"""Prometheus metrics: GET /metrics, and the small functions that the turn
(chatbot/generation.py) and the request log (chatbot/requestlog.py) call.

Under gunicorn every worker writes its values to files in
PROMETHEUS_MULTIPROC_DIR (made afresh by gunicorn.conf.py at each start) and
/metrics sums the files of all the host's workers: any worker answers for all.
Without that directory (flask run, the test client) the process's own registry
is shown.

Names follow OpenTelemetry's GenAI conventions where one exists. No label
holds a session id, a key or any text: label values come from short fixed
lists, so a client cannot grow the number of series.
"""
import hmac
import ipaddress
import os

import prometheus_client
from flask import Blueprint, current_app, request
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, Counter, Gauge, Histogram, multiprocess

from .access import public, unauthorized

bp = Blueprint("metrics", __name__)

prometheus_client.disable_created_metrics()  # the *_created series say nothing we need

# Seconds; replies run from a fraction of a second to minutes.
REPLY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

TIME_TO_FIRST_TOKEN = Histogram("chatbot_time_to_first_token_seconds",
                                "Seconds from the start of a reply to its first text.", buckets=REPLY_BUCKETS)
REPLY_DURATION = Histogram("chatbot_reply_duration_seconds",
                           "Seconds from the start of a reply to its end, whatever ended it.",
                           buckets=REPLY_BUCKETS)
TOKENS = Counter("chatbot_tokens", "Tokens of finished replies (the upstream's count, else our estimate).",
                 ["type"])
REPLIES = Counter("chatbot_replies", "Finished replies, by stored status and finish reason.",
                  ["status", "finish_reason"])
IN_PROGRESS = Gauge("chatbot_replies_in_progress", "Replies being generated now.", multiprocess_mode="livesum")
HTTP_REQUESTS = Counter("chatbot_http_requests", "HTTP requests answered.", ["method", "route", "status"])
HTTP_DURATION = Histogram("chatbot_http_request_duration_seconds",
                          "Seconds from a request to the end of its response (a whole stream).", ["route"],
                          buckets=HTTP_BUCKETS)
UPSTREAM_ERRORS = Counter("chatbot_upstream_errors", "Replies ended by an error of the LLM server.", ["code"])
RESUMES = Counter("chatbot_resumes", "Clients that re-attached to a running or finished reply.")
IDEMPOTENT_REPLAYS = Counter("chatbot_idempotent_replays",
                             "Retried chat requests answered with the turn they had started.")

# Label values outside these lists are counted as "other".
FINISH_REASONS = {"stop", "length", "stopped", "client_gone", "shutdown", "content_filter", "tool_calls"}
STATUSES = {"complete", "incomplete", "failed"}
METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}
UPSTREAM_CODES = {"upstream_unavailable", "upstream_timeout", "upstream_error"}


def _known(value, known):
    return value if value in known else "other"


# --- what the turn calls ---------------------------------------------------

def turn_started():
    IN_PROGRESS.inc()


def first_token(seconds):
    TIME_TO_FIRST_TOKEN.observe(seconds)


def turn_finished(status, finish_reason, seconds, usage, error_code=None):
    """A reply ended (`usage` and `error_code` as stored; an upstream_* error
    is counted as the LLM server's)."""
    IN_PROGRESS.dec()
    if error_code is not None and error_code.startswith("upstream_"):
        upstream_error(error_code)
    REPLIES.labels(_known(status, STATUSES), "none" if finish_reason is None
                   else _known(finish_reason, FINISH_REASONS)).inc()
    REPLY_DURATION.observe(seconds)
    if usage:
        TOKENS.labels("input").inc(usage.get("prompt_tokens") or 0)
        TOKENS.labels("output").inc(usage.get("completion_tokens") or 0)


def upstream_error(code):
    UPSTREAM_ERRORS.labels(_known(code, UPSTREAM_CODES)).inc()


def resumed():
    RESUMES.inc()


def idempotent_replay():
    IDEMPOTENT_REPLAYS.inc()


# --- what the request log calls ----------------------------------------------

def http_request(method, route, status, seconds):
    """`route` is the URL rule (/api/sessions/<session_id>), never the path."""
    route = route or "unmatched"
    HTTP_REQUESTS.labels(_known(method, METHODS), route, str(status)).inc()
    HTTP_DURATION.labels(route).observe(seconds)


# --- GET /metrics --------------------------------------------------------------

def exposition():
    """Every metric of this host, in Prometheus' text format."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = prometheus_client.REGISTRY
    return prometheus_client.generate_latest(registry)


def from_loopback():
    """A request from this machine that did not come through a proxy (nginx on
    the same machine connects from loopback too, and says X-Forwarded-For)."""
    try:
        local = ipaddress.ip_address(request.remote_addr or "").is_loopback
    except ValueError:
        return False
    return local and "X-Forwarded-For" not in request.headers


@bp.get("/metrics")
@public  # not with an API key: the metrics token is its only key
def metrics():
    token = current_app.config["METRICS_TOKEN"]
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if token:
        allowed = scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())
    else:
        allowed = "Authorization" not in request.headers and from_loopback()
    if not allowed:
        raise unauthorized("/metrics takes 'Authorization: Bearer <CHATBOT_METRICS_TOKEN>' (an API key is "
                           "not accepted); without CHATBOT_METRICS_TOKEN it is open to loopback only.")
    # The text format every Prometheus reads (what prometheus_client itself serves by default).
    return current_app.response_class(exposition(), content_type=CONTENT_TYPE_PLAIN_0_0_4)
