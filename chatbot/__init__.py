"""The chatbot backend: a Flask app factory, and every setting's default.

Settings are checked by chatbot/settings.py, whose model is made from DEFAULTS."""
import logging
import os

import click
from flask import Flask

DEFAULTS = {
    # Every setting, with its default; CHATBOT_<NAME> in the environment overrides it.
    "LLM_URL": "http://127.0.0.1:8000",
    "LLM_PROTOCOL": "midm",              # or "openai"
    "LLM_MODEL": None,
    "LLM_API_KEY": None,
    "LLM_CONNECT_TIMEOUT": 5,
    "LLM_FIRST_TOKEN_TIMEOUT": 120,
    "LLM_IDLE_TIMEOUT": 60,
    "LLM_CONNECT_RETRIES": 2,            # only for a refused connection, before anything was sent
    "HEALTH_TIMEOUT": 2,
    "HEALTH_CACHE_SECONDS": 2,           # /api/health asks the LLM server at most this often per worker
    "SYSTEM_PROMPT": "You are a helpful assistant. Answer in the language the user writes in.",
    "CONTEXT_MAX_TOKENS": 4096,
    "DEFAULT_MAX_NEW_TOKENS": 512,
    "MAX_NEW_TOKENS_LIMIT": 4096,
    "DEFAULT_TEMPERATURE": 0.7,
    "TEMPERATURE_LIMIT": 2.0,
    "MAX_MESSAGE_CHARS": 16000,
    "MAX_CONTENT_LENGTH": 1024 * 1024,   # bytes of a request body; larger gets 413
    "SSE_KEEPALIVE": 15,
    "RESUME_GRACE": 5,                   # seconds a reply goes on after its last client left
    "LEASE_SECONDS": 15,                 # a running reply's lease; a dead worker's replies are freed after it
    "IDEMPOTENCY_TTL": 86400,            # seconds an Idempotency-Key is remembered
    "TITLE_MAX_CHARS": 200,              # a title the user sets
    "METADATA_MAX_BYTES": 8192,          # a session's metadata, as compact UTF-8 JSON
    "SYSTEM_PROMPT_MAX_CHARS": 8000,     # a session's own system prompt
    "SESSIONS_PAGE_LIMIT": 100,          # most sessions in one page of GET /api/sessions
    "MESSAGES_PAGE_LIMIT": 200,          # most messages in one page of GET /api/sessions/{id}/messages
    "IMPORT_MAX_BYTES": 16 * 1024 * 1024,  # body of POST /api/sessions/import (exports can be long)
    "MAX_SESSIONS_PER_KEY": 10000,       # sessions a key may keep; 0: no limit
    "MAX_STORED_BYTES_PER_KEY": 1024 ** 3,  # bytes of text a key's sessions may hold (checked on import); 0: no limit
    "WAL_SIZE_LIMIT": 64 * 1024 * 1024,  # bytes the SQLite WAL shrinks back to after a checkpoint
    # Access (chatbot/access.py)
    "AUTH": "required",                  # or "disabled": no keys, every request is the owner 'local'
    "RATE_LIMIT_PER_MINUTE": 600,        # requests per key, all workers together; 0: no limit
    "MAX_STREAMS_PER_KEY": 64,           # replies being generated at once per key; 0: no limit
    "MAX_SOCKETS_PER_KEY": 16,           # WebSockets open at once per key, all workers together; 0: no limit
    "WS_IDLE_TIMEOUT": 300,              # seconds a WebSocket may go without a client frame between turns
    "WS_PING_SECONDS": 25,               # seconds between pings to a WebSocket's client
    "CORS_ORIGINS": "",                  # comma-separated origins allowed from browsers, or "*"; "": CORS off
    "LOG_CONTENT": False,                # put users' messages in the request log
    "WEB_UI": True,                      # the chat page at / (chatbot/web.py)
    "METRICS_TOKEN": None,               # bearer token of GET /metrics; unset: open to loopback only
    # Serving (gunicorn.conf.py)
    "BIND": "127.0.0.1:5000",
    "WORKERS": 2,
    "THREADS": 256,                      # per worker: each open stream holds one
    "WORKER_TIMEOUT": 30,                # gunicorn's heartbeat of a worker's main loop, not a request limit
    "GRACEFUL_TIMEOUT": 30,              # seconds running streams get to finish on a stop or reload
    # PostgreSQL (CHATBOT_DATABASE=postgresql://...): connections per worker process
    "DB_POOL_SIZE": 10,
}


def create_app(test_config=None):
    app = Flask(__name__, instance_relative_config=True, static_folder=None)
    from . import settings

    app.config.update(DEFAULTS, DATABASE=os.path.join(app.instance_path, "chatbot.sqlite"))
    app.config.from_prefixed_env("CHATBOT")
    app.config.update(settings.from_environ(os.environ))  # text settings exactly as written
    if test_config is not None:
        app.config.update(test_config)
    app.config.update(settings.check(app.config))  # SettingsError names a bad one
    from . import db
    try:
        db.check_database(app.config["DATABASE"])
    except ValueError as e:   # a bad URL: one clear line, at start
        raise settings.SettingsError(str(e)) from None
    app.json.ensure_ascii = False  # Korean stays readable in answers
    app.json.sort_keys = False
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    from . import access, chat, errors, health, metrics, openai_api, openapi, requestlog, sessions, ws
    from .llm import Upstream

    app.extensions["upstream"] = Upstream(app.config)
    db.init_app(app)   # creates or upgrades the tables
    errors.init_app(app)
    requestlog.init_app(app)
    access.init_app(app)
    for module in (sessions, chat, health, ws, openapi, metrics, openai_api):
        app.register_blueprint(module.bp)
    ws.sock.init_app(app)
    if str(app.config["WEB_UI"]).lower() not in ("false", "0", "no", "off", ""):
        from . import web
        app.register_blueprint(web.bp)

    @app.cli.command("dev-llm")
    @click.option("--host", default="127.0.0.1")
    @click.option("--port", default=8000, type=int)
    @click.option("--delay", default=0.05, type=float, help="Seconds between streamed words.")
    def dev_llm(host, port, delay):
        """Run the stand-in LLM server (not a real model) for local work and tests."""
        from .standin import run_standin
        click.echo(f"Stand-in LLM server (NOT a real model) on http://{host}:{port}")
        run_standin(host, port, delay)

    return app
