"""One chat turn, generated once and framed three ways (JSON, SSE, WebSocket).

`Turn.events()` yields ("start", ids), ("delta", text), ("idle", None) while
nothing arrives, and ends with ("done", message) or ("error", problem). A
helper thread reads the upstream into a queue, so this loop stays free to
notice a stop request, a client that left, or a timeout, and to close the
upstream at once. Whatever ends the turn, the reply is stored in `finally`.
"""
import logging
import os
import queue
import select
import socket
import sqlite3
import ssl
import threading
import time

from . import context, db, store
from .llm import UpstreamError, UpstreamTimeout

log = logging.getLogger(__name__)

TICK = 0.25             # how often the loop looks around while nothing arrives
STOP_CHECK_SECONDS = 0.5
# Set by the gunicorn worker shortly before a graceful stop would kill it
# (gunicorn.conf.py): running turns end as incomplete and say so.
SHUTDOWN = threading.Event()
INTERNAL_ERROR = {"code": "internal_error", "detail": "The reply could not be generated."}
STOPPED_BEFORE_TEXT = {"code": "stopped", "detail": "The reply was stopped before any text arrived."}
CLIENT_GONE = {"code": "client_gone", "detail": "The client disconnected before the reply was finished."}


class Turn:
    def __init__(self, config, upstream, session_id, user_message_id, reply_id, messages, options,
                 stream=True, client_gone=None):
        self.config = config
        self.session_id, self.user_message_id, self.reply_id = session_id, user_message_id, reply_id
        self.messages = messages
        self.call = upstream.call(messages, options, stream=stream)
        self.client_gone = client_gone or (lambda: False)
        self.queue = queue.Queue()
        self.text = []
        self.pieces = 0
        self.usage = None
        self.completion_tokens = None   # the upstream's count of the reply alone (midm `total_tokens`)
        self.finish_reason = None
        self.message = None   # the stored reply, once the turn is over
        self.stop = threading.Event()  # set by a stop request (see Monitor) or a WebSocket stop frame

    def _read_upstream(self):
        try:
            self.call.open()
            self.queue.put(("opened", None))
            for chunk in self.call.chunks():
                self.queue.put(("chunk", chunk))
            self.queue.put(("end", None))
        except UpstreamError as e:
            self.queue.put(("error", e))
        except Exception as e:  # never let the loop wait forever on a dead reader
            self.queue.put(("error", UpstreamError(f"Reading the LLM server failed: {type(e).__name__}")))

    def events(self):
        outcome = ("failed", None, INTERNAL_ERROR)
        threading.Thread(target=self._read_upstream, daemon=True, name="upstream-reader").start()
        MONITOR.add(self)
        try:
            outcome = yield from self._relay()
        except GeneratorExit:
            # The server closed us: the client went away mid-stream.
            outcome = ("incomplete", "client_gone", CLIENT_GONE)
            raise
        finally:
            self.call.abort()
            MONITOR.remove(self)
            status, finish_reason, error = outcome
            stored_error = error
            if status == "incomplete" and not self.text:
                # A reply with no text is failed, whatever ended it, and says why.
                status, stored_error = "failed", error or STOPPED_BEFORE_TEXT
            conn = db.connect(self.config["DATABASE"])
            try:
                self.message = store.when_not_busy(store.finish_turn, conn, self.session_id, self.reply_id,
                                                   "".join(self.text), status, self._usage(), finish_reason,
                                                   stored_error)
            finally:
                conn.close()
        if error:
            yield "error", {**error, "status": outcome_status(error), "message": self.message}
        else:
            yield "done", self.message

    def _relay(self):
        """Move chunks from the reader to the caller; return (status, finish_reason, error)."""
        cfg = self.config
        started = time.monotonic()
        last_text = None        # monotonic time of the latest piece of text
        next_check = started + STOP_CHECK_SECONDS
        try:
            while True:
                try:
                    kind, value = self.queue.get(timeout=TICK)
                except queue.Empty:
                    kind, value = "idle", None
                if kind == "error":
                    raise value
                if kind == "opened":
                    yield "start", {"session_id": self.session_id, "user_message_id": self.user_message_id,
                                    "message_id": self.reply_id}
                elif kind == "chunk":
                    self.usage = value.usage or self.usage
                    if value.completion_tokens is not None:
                        self.completion_tokens = value.completion_tokens
                    self.finish_reason = value.finish_reason or self.finish_reason
                    if value.text:
                        self.text.append(value.text)
                        self.pieces += 1
                        last_text = time.monotonic()
                        yield "delta", value.text
                elif kind == "end":
                    return "complete", self.finish_reason or "stop", None
                else:
                    yield "idle", None

                now = time.monotonic()
                if last_text is None and now - started > cfg["LLM_FIRST_TOKEN_TIMEOUT"]:
                    raise UpstreamTimeout(
                        f"The LLM server sent no text within {cfg['LLM_FIRST_TOKEN_TIMEOUT']:g} s.")
                if last_text is not None and now - last_text > cfg["LLM_IDLE_TIMEOUT"]:
                    raise UpstreamTimeout(
                        f"The LLM server was silent for more than {cfg['LLM_IDLE_TIMEOUT']:g} s.")
                if self.stop.is_set():
                    return "incomplete", "stopped", None
                if SHUTDOWN.is_set():
                    return "incomplete", "shutdown", None
                if now >= next_check:
                    next_check = now + STOP_CHECK_SECONDS
                    if self.client_gone():
                        return "incomplete", "client_gone", CLIENT_GONE
        except UpstreamError as e:
            return "incomplete", None, {"code": e.code, "detail": e.detail}

    def _usage(self):
        """The upstream's usage when it gave one, else our estimate, marked as such:
        "estimated": true when every count is ours, "estimated_fields" naming ours
        when the upstream counted the completion alone."""
        if self.usage or not self.text:
            return self.usage
        prompt = context.count_tokens(self.messages)
        if self.completion_tokens is not None:
            return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                    "total_tokens": prompt + self.completion_tokens,
                    "estimated_fields": ["prompt_tokens", "total_tokens"]}
        completion = self.pieces if self.call.stream else context.estimate_tokens("".join(self.text))
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion, "estimated": True}


class Monitor:
    """One thread per worker process looks after all its running turns: it
    reads their stop requests (from any process, via the database) and saves
    their heartbeat and partial text, one query for all of them at a time.
    Per-turn queries would make hundreds of streams queue for SQLite's single
    writer."""

    def __init__(self):
        self.lock = threading.Lock()
        self.turns = {}
        self.pid = None

    def add(self, turn):
        with self.lock:
            self.turns[turn.reply_id] = turn
            if self.pid != os.getpid():  # first turn of this (possibly forked) process
                self.pid = os.getpid()
                threading.Thread(target=self._run, daemon=True, name="turn-monitor").start()

    def remove(self, turn):
        with self.lock:
            self.turns.pop(turn.reply_id, None)

    def _run(self):
        connections = {}   # a test process may serve several databases
        next_heartbeat = time.monotonic() + store.HEARTBEAT_SECONDS
        while True:
            time.sleep(STOP_CHECK_SECONDS)
            heartbeat = time.monotonic() >= next_heartbeat
            if heartbeat:
                next_heartbeat = time.monotonic() + store.HEARTBEAT_SECONDS
            with self.lock:
                turns = list(self.turns.values())
            by_database = {}
            for turn in turns:
                by_database.setdefault(turn.config["DATABASE"], []).append(turn)
            for path, group in by_database.items():
                try:
                    conn = connections.get(path) or connections.setdefault(path, db.connect(path))
                    stopped = store.stop_requests(conn, {t.session_id for t in group})
                    for turn in group:
                        if turn.session_id in stopped:
                            turn.stop.set()
                    if heartbeat:
                        store.heartbeat(conn, [(t.session_id, t.reply_id, "".join(t.text)) for t in group])
                except sqlite3.Error:
                    log.exception("turn monitor: database error (will retry)")


MONITOR = Monitor()


def outcome_status(error):
    """The HTTP status that goes with an error code of a turn."""
    return {"upstream_unavailable": 503, "upstream_timeout": 504}.get(error["code"], 502)


def client_watcher(environ):
    """A function that tells whether the HTTP client has closed its connection.

    A WSGI app otherwise learns it only when a write fails, which during a long
    upstream silence can take a minute of wasted generation. gunicorn and
    werkzeug hand us the client socket; a zero-byte peek means it closed.
    """
    sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
    if sock is None or isinstance(sock, ssl.SSLSocket):
        return None

    def gone():
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True
    return gone
