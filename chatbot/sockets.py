"""The limits of a WebSocket (chatbot/ws.py), so that one key cannot hold the
service's threads or get round the limits every HTTP request meets:

- a frame is at most CHATBOT_MAX_CONTENT_LENGTH bytes, refused while it
  arrives (simple-websocket's max_message_size), not after it was buffered;
- a key has at most CHATBOT_MAX_SOCKETS_PER_KEY sockets open, all workers
  together (store/sockets.py); one more is a plain 429 before the upgrade;
- a socket with no client frame for CHATBOT_WS_IDLE_TIMEOUT seconds between
  turns is closed; pings every CHATBOT_WS_PING_SECONDS seconds close a
  socket whose peer has gone silently (and keep proxies from timing it out);
- every frame re-checks the key (a revoked key is refused at its next frame)
  and every chat frame counts against the key's request rate;
- one log line per socket and one per turn, like the request log.
"""
import json
import time

from flask import current_app, g, request
from simple_websocket import ConnectionClosed

from . import metrics, store
from .access import key_owner, per_key_limit, rate_limited, unauthorized
from .db import get_db
from .errors import ApiError
from .requestlog import access_log
from .store.sockets import SOCKET_LEASE_SECONDS, close_socket, open_socket, renew_socket

POLICY_VIOLATION = 1008
RENEW_SECONDS = SOCKET_LEASE_SECONDS / 3


def init_blueprint(bp):
    """Wire the limits into the WebSocket's blueprint."""
    bp.record_once(_server_options)
    bp.before_request(_take_socket)
    bp.teardown_request(_release_socket)


def _server_options(state):
    config = state.app.config
    config.setdefault("SOCK_SERVER_OPTIONS", {
        "max_message_size": config["MAX_CONTENT_LENGTH"],
        "ping_interval": config["WS_PING_SECONDS"],
    })


def _take_socket():
    """Before the upgrade: count the socket against its key's cap (429 when full)."""
    g.socket_id = None
    if not request.environ.get("HTTP_UPGRADE", "").lower() == "websocket":
        return   # a plain GET: flask-sock answers it
    limit = per_key_limit("MAX_SOCKETS_PER_KEY")
    if not limit:
        return
    g.socket_id = open_socket(get_db(), g.owner, limit)
    if g.socket_id is None:
        raise ApiError(429, "too_many_sockets",
                       f"This key already has {limit} WebSockets open; close one first.",
                       headers={"Retry-After": "5"})


def _release_socket(error=None):
    socket_id = g.pop("socket_id", None)
    if socket_id is not None:
        store.when_not_busy(close_socket, get_db(), socket_id)


class GuardedSocket:
    """The simple-websocket Server with the limits above; relay() and the
    receive loop use it as they would the socket itself."""

    def __init__(self, ws):
        self.ws = ws
        self.opened = time.monotonic()
        self.last_frame = self.opened
        self.next_renewal = self.opened + RENEW_SECONDS
        self.turns = 0
        self.closed_by = "client"
        self.key = request.headers.get("Authorization", "").partition(" ")[2].strip()
        g.skip_request_log = True   # this socket logs its own lines
        self.idle_timeout = current_app.config["WS_IDLE_TIMEOUT"]

    def __getattr__(self, name):
        return getattr(self.ws, name)

    def _renew(self):
        if g.get("socket_id") and time.monotonic() >= self.next_renewal:
            self.next_renewal = time.monotonic() + RENEW_SECONDS
            store.when_not_busy(renew_socket, get_db(), g.socket_id)

    def receive(self, timeout=None):
        self._renew()
        return self.ws.receive(timeout)

    def next_frame(self):
        """The next client frame, or None once the socket has been idle for
        longer than the idle timeout (it is then closed)."""
        while True:
            left = self.last_frame + self.idle_timeout - time.monotonic()
            if left <= 0:
                self.closed_by = "idle"
                self.ws.close(message=f"No frame for {self.idle_timeout:g} s.")
                return None
            raw = self.receive(timeout=min(RENEW_SECONDS, left))
            if raw is not None:
                self.last_frame = time.monotonic()
                return raw

    def check_frame(self, frame):
        """Before a frame is acted on: the key must still be valid, and a chat
        frame counts against the key's request rate. Raises ApiError."""
        if current_app.config["AUTH"] == "required" and key_owner(get_db(), self.key) != g.owner:
            self.closed_by = "key_revoked"
            raise unauthorized("The API key is not valid any more (revoked); the socket is closed.")
        limit = per_key_limit("RATE_LIMIT_PER_MINUTE")
        if frame.get("type") in ("chat", "resume") and limit:   # each is what a request would be over HTTP
            wait = store.take_request(get_db(), g.owner, limit, 60)
            if wait:
                raise rate_limited(limit, wait)

    @staticmethod
    def error_extra(error):
        """The fields of an error frame beyond code and detail."""
        extra = {"errors": error.errors} if error.errors else {}
        if "Retry-After" in error.headers:
            extra["retry_after"] = int(error.headers["Retry-After"])
        return extra

    def refuse(self, error):
        """Close the socket after an error that ends it (a revoked key)."""
        try:
            self.ws.close(reason=POLICY_VIOLATION, message=error.detail[:120])
        except ConnectionClosed:
            pass

    def logged_turn(self, events, kind, session_id):
        """The events of a chat (or resume) frame, passed on as they are; one
        log line when they end, however they end."""
        started, fields = time.monotonic(), {"status": None, "finish_reason": None, "error": None}
        try:
            for event in events:
                name, value = event[0], event[1]
                if name == "done":
                    fields.update(status=value.get("status"), finish_reason=value.get("finish_reason"))
                elif name == "error":
                    fields.update(status=(value.get("message") or {}).get("status", "failed"), error=value.get("code"))
                yield event
        finally:
            events.close()
            self.last_frame = time.monotonic()   # idle time counts between turns, not during one
            self.turns += 1
            if fields["status"] is None:
                fields["status"] = "client_gone"   # the socket closed before the reply's end
            _log({"method": "WS", "path": request.path, "event": "turn" if kind == "chat" else kind, **fields,
                  "session_id": session_id, "key": g.get("key_name")}, started)

    def log_socket(self):
        if self.ws.max_message_size and self.ws.incoming_message_len > self.ws.max_message_size:
            self.closed_by = "frame_too_big"
        _log({"method": "GET", "path": request.path, "status": 101, "event": "socket", "turns": self.turns,
              "closed_by": self.closed_by, "key": g.get("key_name")}, self.opened)
        metrics.http_request("GET", request.url_rule.rule, 101, time.monotonic() - self.opened)


def _log(fields, started):
    fields["duration_ms"] = round((time.monotonic() - started) * 1000, 1)
    access_log.info(json.dumps(fields, ensure_ascii=False))
