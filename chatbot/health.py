"""GET /api/health: the database and the LLM server, each with its latency."""
import threading
import time

from flask import Blueprint, current_app

from . import store
from .access import authenticate, public
from .db import get_db
from .errors import ApiError
from .store import StoreError

bp = Blueprint("health", __name__, url_prefix="/api")

# The LLM server's state is asked at most once per HEALTH_CACHE_SECONDS per
# worker process: the endpoint needs no key, so anyone could otherwise turn
# each of their calls into a call upstream.
_cache_lock = threading.Lock()


def llm_state(app):
    upstream = app.extensions["upstream"]
    ttl = float(app.config["HEALTH_CACHE_SECONDS"])
    with _cache_lock:   # one thread asks; the others wait for its answer
        at, state = app.extensions.get("health_cache", (None, None))
        if at is None or time.monotonic() - at >= ttl:
            state = upstream.health()
            app.extensions["health_cache"] = (time.monotonic(), state)
    return dict(state)


def has_key():
    """Whether the caller sent a valid API key (or keys are off)."""
    try:
        authenticate()
        return True
    except (ApiError, StoreError):   # the database down: health says so, not a 503 of its own
        return False


@bp.get("/health")
@public
def health():
    started = time.monotonic()
    try:
        get_db().execute("SELECT 1 FROM sessions LIMIT 1").fetchone()  # the table is there; no scan
        database = {"ok": True}
    except StoreError as e:
        database = {"ok": False, "error": str(e)}
    database["latency_ms"] = round((time.monotonic() - started) * 1000, 1)
    llm = llm_state(current_app)
    if not has_key():
        llm.pop("url")   # where the LLM server is, is for the service's own clients
    auth = current_app.config["AUTH"]  # "disabled" here is the loud warning a monitor sees
    body = {"database": database, "llm": llm, "auth": auth,
            # the original backend's fields, for its clients
            "llm_server_available": llm["ok"], "database_connected": database["ok"], "timestamp": store.now_iso()}
    if not database["ok"]:
        return {"status": "unavailable", **body}, 503
    return {"status": "ok" if llm["ok"] else "degraded", **body}
