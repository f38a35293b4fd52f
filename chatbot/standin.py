"""Stand-in LLM server: a fake model for instant local starts, tests and benchmarks.

It speaks the midm_LLM_serving protocol (/health, /chat, /chat/stream) and the
OpenAI-compatible one (/v1/models, /v1/chat/completions). /chat/stream sends
midm_LLM_serving's own typed events by default (format "serving": start, chunk,
complete, [DONE]; with @@error=N an error after N pieces, then a normal end),
or, with @@format=X, one of the other shapes a server behind that protocol may
use. Every answer carries the MARKER, the model name "standin" and an
``X-Standin-LLM: true`` header, so it can never pass for a real model.

Directives in the last user message make that one request misbehave on purpose:
@@words=N @@delay=S @@first=S @@headers=S @@silence=S@K @@break=N @@error=N
@@status=CODE[@text] @@split @@format=X @@nodone @@nofinish @@nousage.  @@headers
holds the answer's headers back for S seconds (a server that queues the
request), and logs the call as cancelled if the client leaves meanwhile.
Recent calls can be inspected
at GET /_standin/requests (and cleared with DELETE).

Streaming relies on werkzeug's threaded dev server (run_standin): every yielded
bytes object is written as one HTTP/1.1 chunk and flushed at once.
"""
import argparse
import json
import re
import select
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass

from flask import Flask, Response, jsonify, request
from werkzeug import serving

MARKER = "[stand-in LLM, not a real model] "
_DIRECTIVE = re.compile(
    r"@@(words|delay|first|headers|silence|break|error|status|split|format|nodone|nofinish|nousage)(?:=(\S+))?"
)
_FORMATS = ("serving", "token", "content", "text", "delta", "response", "openai", "plain")
_ERROR_TEXT = "stand-in error requested"


class _RequestLog:
    """The last `size` generation calls, shared between request threads."""

    def __init__(self, size: int = 200):
        self._lock = threading.Lock()
        self._entries: deque[dict] = deque(maxlen=size)
        self._next_id = 1

    def add(self, path: str, body, authorization) -> dict:
        with self._lock:
            entry = {"id": self._next_id, "path": path, "body": body, "authorization": authorization,
                     "state": "running", "pieces_sent": 0, "started": time.time(), "ended": None}
            self._next_id += 1
            self._entries.append(entry)
            return entry

    def update(self, entry: dict, **fields) -> None:
        with self._lock:
            entry.update(fields)

    def end(self, entry: dict, state: str, pieces_sent: int | None = None) -> None:
        with self._lock:
            entry.update(state=state, ended=time.time())
            if pieces_sent is not None:
                entry["pieces_sent"] = pieces_sent

    def snapshot(self) -> list[dict]:
        with self._lock:
            return [dict(e) for e in self._entries]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


@dataclass
class _Plan:
    delay: float
    words: int | None = None
    first: float = 0.0
    headers: float = 0.0
    silence: tuple[float, int] | None = None
    break_at: int | None = None
    error_at: int | None = None
    status: int | None = None
    status_text: bool = False
    split: bool = False
    fmt: str = "serving"
    nodone: bool = False
    nofinish: bool = False
    nousage: bool = False


def _num(value: str, kind=float):
    n = kind(value)
    if n < 0:
        raise ValueError(f"negative value {value!r}")
    return n


def _read_directives(text: str, delay: float) -> tuple[_Plan, str]:
    """Return the plan for this request and the text with the directives removed."""
    plan = _Plan(delay=delay)
    for name, value in _DIRECTIVE.findall(text):
        if name == "words":
            plan.words = _num(value, int)
        elif name in ("delay", "first", "headers"):
            setattr(plan, name, _num(value))
        elif name == "silence":
            secs, _, after = value.partition("@")
            plan.silence = (_num(secs), _num(after, int))
        elif name == "break":
            plan.break_at = _num(value, int)
        elif name == "error":
            plan.error_at = _num(value, int)
        elif name == "status":
            code, _, kind = value.partition("@")
            plan.status, plan.status_text = int(code), kind == "text"
            if not 400 <= plan.status <= 599:
                raise ValueError(f"status {code} is not an error status")
        elif name == "format":
            if value not in _FORMATS:
                raise ValueError(f"unknown format {value!r}")
            plan.fmt = value
        else:  # flags: split, nodone, nofinish, nousage
            setattr(plan, name, True)
    return plan, " ".join(_DIRECTIVE.sub(" ", text).split())


def _text(content) -> str:
    # OpenAI clients may send content as a list of parts or null.
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _check(body, cap_field: str) -> str | None:
    if not isinstance(body, dict):
        return "body must be a JSON object"
    messages = body.get("messages")
    if not isinstance(messages, list):
        return "'messages' must be a list"
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        return "every message must be an object with a string 'role'"
    cap = body.get(cap_field)
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
        return f"'{cap_field}' must be a positive integer"
    return None


def _pieces(plan: _Plan, echo: str, n_context: int) -> list[str]:
    if plan.words is not None:
        pieces = [f"단어{i} " for i in range(1, plan.words + 1)]
    else:
        sentence = (f"안녕하세요! 저는 테스트용 대역 서버입니다. You said: {echo or '(nothing)'} "
                    f"({n_context} messages in context)")
        pieces = re.findall(r"\S+\s*", sentence)
    # The marker rides on the first piece so even a 1-token answer is marked.
    return [MARKER + (pieces[0] if pieces else "")] + pieces[1:]


def _sse(obj) -> bytes:
    # Raw UTF-8 (not \uXXXX) so clients must really decode multi-byte text.
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


_DONE = b"data: [DONE]\n\n"


def _serving_events(plan: _Plan, pieces: list[str]):
    """midm_LLM_serving's own stream: (events, head, tail, error, at_once).

    As that server does: `start` and `error` are ASCII-escaped JSON, the others
    raw UTF-8; `token_count` counts the pieces; an error ends the body without
    [DONE]. @@nousage leaves out `total_tokens`, @@nofinish the `complete` event.
    """
    events, text = [], ""
    for n, piece in enumerate(pieces, 1):
        text += piece
        events.append(_sse({"type": "chunk", "content": piece, "accumulated": text, "token_count": n}))
    complete = {"type": "complete", "full_response": text, "total_tokens": len(pieces)}
    if plan.nousage:
        del complete["total_tokens"]
    # `start` goes out before the model is asked (so at once, whatever @@first says).
    start = [f"data: {json.dumps({'type': 'start', 'message': 'Stream started'})}\n\n".encode()]
    tail = ([] if plan.nofinish else [_sse(complete)]) + ([] if plan.nodone else [_DONE])
    error = f"data: {json.dumps({'type': 'error', 'message': _ERROR_TEXT})}\n\n".encode()
    return events, [], tail, error, start


def _split_utf8(data: bytes) -> list[bytes]:
    """Cut right after the lead byte of every multi-byte character."""
    parts, start = [], 0
    for i, byte in enumerate(data):
        if byte >= 0xC0:
            parts.append(data[start:i + 1])
            start = i + 1
    return parts + [data[start:]] if start < len(data) else parts


def _stream(log, entry, sock, plan: _Plan, events: list[bytes], head: list[bytes], tail: list[bytes],
            error: bytes, at_once: list[bytes] = ()):
    sent = 0
    try:
        # werkzeug sends status line and headers on an empty write without writing
        # a chunk, so the client gets headers at once even when @@first keeps the
        # body silent.
        yield b""
        yield from at_once  # sent before the model starts (midm_LLM_serving's `start`)
        time.sleep(plan.first)
        yield from head
        for i in range(len(events) + 1):
            if plan.break_at == sent:
                _cut(log, entry, sock)
            if plan.error_at == sent:
                yield error
                log.end(entry, "finished")
                return
            if i == len(events):
                break
            if i and plan.delay:
                time.sleep(plan.delay)
            if plan.split:
                for k, part in enumerate(_split_utf8(events[i])):
                    if k:
                        time.sleep(0.01)
                    yield part
            else:
                yield events[i]
            sent += 1
            log.update(entry, pieces_sent=sent)
            if plan.silence and plan.silence[1] == sent:
                time.sleep(plan.silence[0])
        yield from tail
        log.end(entry, "finished")
    except GeneratorExit:
        # werkzeug closes the iterable when a write fails: the client went away.
        log.end(entry, "cancelled")
        raise


def _client_left_within(sock, seconds):
    """Wait up to `seconds`; True as soon as the client closes its connection
    (its request was read whole, so anything readable now is the end)."""
    if sock is None:
        time.sleep(seconds)
        return False
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if poller.poll(left * 1000):
            try:
                return sock.recv(1, socket.MSG_PEEK) == b""
            except OSError:
                return True
    return False


def _cut(log, entry, sock):
    """Drop the connection abruptly (@@break)."""
    log.end(entry, "broken")
    # Shutting the socket down makes the client see EOF even when no headers went
    # out yet (werkzeug would otherwise wait for a next request on the connection).
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    # werkzeug treats a ConnectionError from the app iterable as a dropped
    # connection: it stops without writing the 0\r\n\r\n terminator and without
    # logging a traceback.
    raise ConnectionAbortedError("stand-in @@break")


def _broken(log, entry, sock):
    _cut(log, entry, sock)
    yield b""  # unreachable; makes this a generator


def create_standin_app(delay: float = 0.05, api_key: str | None = None) -> Flask:
    app = Flask(__name__)
    log = _RequestLog()
    app.extensions["standin_log"] = log

    @app.after_request
    def mark_standin(resp):
        resp.headers["X-Standin-LLM"] = "true"
        return resp

    def auth_error():
        if api_key is None or request.headers.get("Authorization") == f"Bearer {api_key}":
            return None
        return jsonify(error={"message": "Incorrect API key provided (stand-in LLM server)",
                              "type": "invalid_request_error", "code": "invalid_api_key"}), 401

    def refusal(openai: bool, plan: _Plan | None, problem: str | None):
        if problem is not None:
            if openai:
                return jsonify(error={"message": problem, "type": "invalid_request_error"}), 400
            return jsonify(detail=[{"loc": ["body"], "msg": problem, "type": "value_error"}]), 422
        if plan.status_text:
            return Response("stand-in plain error", plan.status, mimetype="text/plain")
        if openai:
            return jsonify(error={"message": "stand-in error", "type": "server_error",
                                  "code": plan.status}), plan.status
        return jsonify(detail="stand-in error"), plan.status

    def generate(openai: bool):
        """Shared front half of the generation endpoints: log, check, plan.

        Returns (entry, job, None), or (entry, None, response) when refused."""
        body = request.get_json(silent=True, force=True)
        entry = log.add(request.path, body, request.headers.get("Authorization"))
        denied = auth_error() if openai else None
        if denied:
            log.end(entry, "finished")
            return entry, None, denied
        cap_field = "max_tokens" if openai else "max_new_tokens"
        plan, problem = None, _check(body, cap_field)
        if problem is None:
            messages = body["messages"]
            last_user = next((_text(m.get("content")) for m in reversed(messages)
                              if m.get("role") == "user"), "")
            try:
                plan, echo = _read_directives(last_user, delay)
            except ValueError as e:
                problem = f"bad stand-in directive: {e}"
        if problem is not None or plan.status:
            log.end(entry, "finished")
            return entry, None, refusal(openai, plan, problem)
        if plan.headers and _client_left_within(request.environ.get("werkzeug.socket"), plan.headers):
            log.end(entry, "cancelled")
            return entry, None, Response(status=499)  # nobody reads it

        n_context = sum(m["role"] in ("user", "assistant") for m in messages)
        pieces = _pieces(plan, echo, n_context)
        cap = body.get(cap_field)
        finish = "length" if cap and len(pieces) > cap else "stop"
        pieces = pieces[:cap] if cap else pieces
        prompt = sum(len(_text(m.get("content"))) // 2 + 1 for m in messages)
        usage = {"prompt_tokens": prompt, "completion_tokens": len(pieces),
                 "total_tokens": prompt + len(pieces)}
        return entry, (body, plan, pieces, finish, usage), None

    def sse_response(entry, plan, events, head, tail, error, at_once=()):
        gen = _stream(log, entry, request.environ.get("werkzeug.socket"), plan, events, head, tail, error,
                      at_once)
        return Response(gen, mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def whole_answer(entry, job, error_body, render):
        # Non-streamed calls honour @@first, @@status, @@error and @@break only.
        _, plan, pieces, finish, usage = job
        if plan.break_at is not None:
            return Response(_broken(log, entry, request.environ.get("werkzeug.socket")))
        time.sleep(plan.first)
        if plan.error_at is not None:
            log.end(entry, "finished")
            return jsonify(error_body), 500
        log.end(entry, "finished", len(pieces))
        return jsonify(render("".join(pieces), finish, usage))

    @app.get("/health")
    def health():
        return jsonify(status="healthy", model_loaded=True, device="cpu", cuda_available=False,
                       standin=True, note="stand-in LLM server, not a real model")

    @app.post("/chat")
    def midm_chat():
        entry, job, failed = generate(openai=False)
        return failed or whole_answer(entry, job, {"detail": _ERROR_TEXT},
                                      lambda text, finish, usage: {"response": text, "usage": usage})

    @app.post("/chat/stream")
    def midm_stream():
        entry, job, failed = generate(openai=False)
        if failed:
            return failed
        _, plan, pieces, _, usage = job
        if plan.fmt == "serving":
            return sse_response(entry, plan, *_serving_events(plan, pieces))
        if plan.fmt == "plain":
            events = [f"data: {p}\n\n".encode() for p in pieces]
        elif plan.fmt == "openai":
            events = [_sse({"choices": [{"delta": {"content": p}}]}) for p in pieces]
        else:
            events = [_sse({plan.fmt: p}) for p in pieces]
        tail = ([] if plan.nousage else [_sse({"usage": usage})]) + ([] if plan.nodone else [_DONE])
        return sse_response(entry, plan, events, [], tail, _sse({"error": _ERROR_TEXT}))

    @app.get("/v1/models")
    def models():
        return auth_error() or jsonify(object="list", data=[{"id": "standin", "object": "model",
                                                             "owned_by": "standin"}])

    @app.post("/v1/chat/completions")
    def openai_chat():
        entry, job, failed = generate(openai=True)
        if failed:
            return failed
        body, plan, pieces, finish, usage = job
        error = {"error": {"message": _ERROR_TEXT, "type": "server_error"}}
        base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": "standin"}
        if not body.get("stream"):
            return whole_answer(entry, job, error, lambda text, finish, usage: {
                **base, "object": "chat.completion", "usage": usage,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish}]})

        def chunk(delta, finish_reason=None):
            return _sse({**base, "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})

        head = [chunk({"role": "assistant", "content": ""})]
        tail = [] if plan.nofinish else [chunk({}, finish)]
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") and not plan.nousage:
            tail.append(_sse({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}))
        tail += [] if plan.nodone else [_DONE]
        events = [chunk({"content": p}) for p in pieces]
        return sse_response(entry, plan, events, head, tail, _sse(error))

    @app.get("/_standin/requests")
    def list_requests():
        return jsonify(requests=log.snapshot())

    @app.delete("/_standin/requests")
    def clear_requests():
        log.clear()
        return jsonify(requests=[])

    return app


def run_standin(host: str = "127.0.0.1", port: int = 8000, delay: float = 0.05) -> None:
    # werkzeug listens with a backlog of 128: a burst of hundreds of streams
    # (benchmarks, tests) would overflow it, and the kernel would drop SYNs that
    # clients retry only after 1, 3, 7... seconds.
    serving.BaseWSGIServer.request_queue_size = 2048
    serving.run_simple(host, port, create_standin_app(delay), threaded=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Stand-in LLM server (not a real model).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--delay", type=float, default=0.05, help="seconds between streamed pieces")
    args = parser.parse_args()
    run_standin(args.host, args.port, args.delay)
