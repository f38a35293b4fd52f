"""GET /api/health: the database and the LLM server, each with its latency."""
import sqlite3
import time

from flask import Blueprint, current_app

from . import store
from .access import public
from .db import get_db

bp = Blueprint("health", __name__, url_prefix="/api")


@bp.get("/health")
@public
def health():
    started = time.monotonic()
    try:
        get_db().execute("SELECT count(*) FROM sessions").fetchone()
        database = {"ok": True}
    except sqlite3.Error as e:
        database = {"ok": False, "error": str(e)}
    database["latency_ms"] = round((time.monotonic() - started) * 1000, 1)
    llm = current_app.extensions["upstream"].health()
    auth = current_app.config["AUTH"]  # "disabled" here is the loud warning a monitor sees
    body = {"database": database, "llm": llm, "auth": auth,
            # the original backend's fields, for its clients
            "llm_server_available": llm["ok"], "database_connected": database["ok"], "timestamp": store.now_iso()}
    if not database["ok"]:
        return {"status": "unavailable", **body}, 503
    return {"status": "ok" if llm["ok"] else "degraded", **body}
