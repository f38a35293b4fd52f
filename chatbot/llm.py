"""The upstream LLM server: one client, two small protocol adapters.

`Upstream.call(...)` returns a `Call`: after `open()`, `read(timeout)` gives
the `Chunk`s the network delivered within `timeout` (`chunks()` yields them
all, blocking), for either protocol, streamed or not. Every failure
becomes one of three typed errors. `Call.abort()` (from any thread) closes the
connection, which is how a client that left or a stop request reaches the
upstream, even while it has not answered yet.
"""
import codecs
import http.cookiejar
import json
import logging
import re
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlsplit, urlunsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter

READ_SIZE = 65536
# After the stream's last event, how long the end of its body may take to
# arrive for the connection to go back to the pool (else it is closed).
DRAIN_SECONDS = 0.05
DRAIN_BYTES = 65536
ERROR_BODY_LOGGED = 300   # characters of an upstream's error body that reach the log

log = logging.getLogger(__name__)
USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#@\s]*@")


def without_credentials(url):
    """The URL without its user:password@ part: what answers, logs and
    stored fields may show of it."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def redacted(text, *secrets):
    """Text from elsewhere (an upstream's error body) made fit for our log:
    credentials in URLs and the given secrets blanked out."""
    text = USERINFO.sub(r"\1***@", text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


class UpstreamError(Exception):
    status, code = 502, "upstream_error"

    def __init__(self, detail):
        super().__init__(detail)
        self.detail = detail


class UpstreamUnavailable(UpstreamError):
    status, code = 503, "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    status, code = 504, "upstream_timeout"


class UpstreamCut(UpstreamError):
    """The stream broke off mid-answer: the reply is incomplete."""


@dataclass
class Chunk:
    text: str = ""
    usage: Optional[dict] = None
    finish_reason: Optional[str] = None
    # The completion's token count when the upstream gives only that (midm_LLM_serving's
    # `total_tokens`); the prompt's is then ours to estimate.
    completion_tokens: Optional[int] = None
    # midm_LLM_serving's event `type` (start, chunk, complete), when the event had one.
    kind: Optional[str] = None


# --- the two protocols -------------------------------------------------------

TEXT_FIELDS = ("token", "content", "text", "delta", "response")


def _openai_chunk(obj):
    choices = obj.get("choices") or []
    choice = choices[0] if choices else {}
    delta = choice.get("delta") or choice.get("message") or {}
    return Chunk(delta.get("content") or "", token_usage(obj.get("usage")), choice.get("finish_reason"))


def token_usage(usage):
    """The upstream's usage in our shape, or None (then we estimate) when it
    gives none or one we cannot read."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if _count(prompt) is None or _count(completion) is None:
        return None
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _count(value):
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _error_detail(error):
    if isinstance(error, dict):
        return str(error.get("message") or error.get("detail") or error)
    return str(error)


# midm_LLM_serving's own events: {"type": "start", "message"} (no text),
# {"type": "chunk", "content", "accumulated", "token_count"},
# {"type": "complete", "full_response", "total_tokens"}, and on a failure
# mid-answer {"type": "error", "message"}, after which its stream ends normally.
SERVING_TYPES = ("start", "chunk", "complete", "error")


def _serving_event(obj):
    kind = obj["type"]
    if kind == "error":
        raise UpstreamError(f"The LLM server reported an error: {_error_detail(obj.get('message') or obj)}")
    if kind == "chunk":
        # Only `content` is new text: `accumulated` repeats everything sent so far.
        text = obj.get("content")
        return Chunk(text if isinstance(text, str) else "", kind=kind)
    if kind == "complete":
        # `full_response` repeats the whole text: the chunks already carried it.
        return Chunk("", token_usage(obj.get("usage")), obj.get("finish_reason") or "stop",
                     _count(obj.get("total_tokens")), kind=kind)
    return Chunk("", kind=kind)


def parse_event(data):
    """One SSE `data:` payload (either protocol) -> a Chunk, or None for [DONE].

    midm_LLM_serving's typed events are read as that server sends them (see
    SERVING_TYPES); other servers behind the midm protocol differ, so accept
    every common shape too: a JSON object with the text under one of
    TEXT_FIELDS, an OpenAI chunk, a JSON string, or plain text.
    """
    if data.strip() == "[DONE]":
        return None
    try:
        obj = json.loads(data)
    except ValueError:
        return Chunk(data)
    if not isinstance(obj, dict):
        return Chunk(obj if isinstance(obj, str) else data)
    if obj.get("type") in SERVING_TYPES:
        return _serving_event(obj)
    if obj.get("error"):
        raise UpstreamError(f"The LLM server reported an error: {_error_detail(obj['error'])}")
    if "choices" in obj:
        return _openai_chunk(obj)
    text = next((obj[k] for k in TEXT_FIELDS if isinstance(obj.get(k), str)), "")
    return Chunk(text, token_usage(obj.get("usage")), obj.get("finish_reason"))


def parse_whole(protocol, obj):
    """A non-streamed answer -> one Chunk."""
    if not isinstance(obj, dict):
        raise UpstreamError("The LLM server answered with an unexpected body.")
    if obj.get("error"):
        raise UpstreamError(f"The LLM server reported an error: {_error_detail(obj['error'])}")
    if protocol == "openai":
        chunk = _openai_chunk(obj)
    else:
        chunk = Chunk(obj.get("response"), token_usage(obj.get("usage")), obj.get("finish_reason") or "stop")
    if not isinstance(chunk.text, str):
        raise UpstreamError("The LLM server's answer has no text.")
    return chunk


def midm_finish_reason(usage, max_new_tokens, completion_tokens=None):
    """midm_LLM_serving says no finish_reason (its `complete` event means only
    "ended"): a reply that used all of max_new_tokens was cut by that cap
    ("length"), any other ended ("stop")."""
    if usage:
        completion_tokens = usage["completion_tokens"]
    if completion_tokens is not None and max_new_tokens and completion_tokens >= max_new_tokens:
        return "length"
    return "stop"


class SSEParser:
    """The `data` of each Server-Sent Event in bytes fed as they arrive.

    Decodes UTF-8 incrementally, so a character split across two network reads
    is joined, and gives each event as soon as its blank line arrives.
    """

    def __init__(self):
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.buffer, self.data = "", []

    def feed(self, raw):
        """The events `raw` completes (b"" means the end: a last event without its blank line counts)."""
        events = []
        self.buffer += self.decoder.decode(raw, final=not raw)
        *lines, self.buffer = self.buffer.split("\n")
        for line in lines:
            line = line.removesuffix("\r")
            if not line:
                if self.data:
                    events.append("\n".join(self.data))
                    self.data = []
            elif line.startswith("data:"):
                self.data.append(line[5:].removeprefix(" "))
            # comments (":") and other fields (event:, id:, retry:) carry no text
        if not raw:
            if self.buffer.startswith("data:"):
                self.data.append(self.buffer[5:].removeprefix(" "))
            if self.data:
                events.append("\n".join(self.data))
            self.buffer, self.data = "", []
        return events


def sse_data(read):
    """Yield the `data` of each Server-Sent Event from `read()` (bytes, b"" at the end)."""
    parser = SSEParser()
    while True:
        raw = read()
        yield from parser.feed(raw)
        if not raw:
            return


class BodyCut(Exception):
    """The connection ended (or sent nonsense) before the end of the body."""


class Body:
    """A streamed answer's body read straight off its connection's socket.

    One network read per call, no layers between: the transfer coding
    (chunked, a Content-Length, or to the close) is undone here. And since
    no bytes wait in a buffer of someone else's, `poll` on the socket tells
    truly whether more has come, so the reader can wait with a timeout (for
    keep-alives, a gone client or a stop) on the socket itself.
    """
    MAX_LINE = 4096

    def __init__(self, sock, head, chunked, length):
        self.sock, self.raw = sock, bytearray(head)
        if chunked:
            self.phase, self.left = "size", 0
        elif length is not None:
            self.phase, self.left = ("data", length) if length else ("end", 0)
        else:
            self.phase, self.left = "close", 0
        self.chunked = chunked
        # Non-blocking: a read tries the socket first and waits in poll only
        # when nothing is there (under load something usually is: one system call).
        self.timeout = sock.gettimeout()
        sock.setblocking(False)
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR)

    @property
    def ended(self):
        return self.phase == "end"

    def read(self, timeout=None):
        """The body's bytes that arrive within `timeout` seconds (None: however
        long it takes): b"" when none came or the body is over (`ended`).
        Raises BodyCut, or OSError, if the connection fails first."""
        data = self._decode()
        if data or self.ended:
            return data
        try:
            got = self.sock.recv(READ_SIZE)
        except (BlockingIOError, ssl.SSLWantReadError):
            if not self.poller.poll(None if timeout is None else max(0, int(timeout * 1000))):
                return b""
            try:
                got = self.sock.recv(READ_SIZE)
            except (BlockingIOError, ssl.SSLWantReadError):   # part of a TLS record
                return b""
        if not got:
            if self.phase != "close":
                raise BodyCut("the connection closed before the end of the body")
            self.phase = "end"
            return b""
        self.raw += got
        return self._decode()

    def _decode(self):
        out, raw = [], self.raw
        while raw:
            if self.phase in ("data", "close"):
                n = len(raw) if self.phase == "close" else min(self.left, len(raw))
                out.append(bytes(raw[:n]))
                del raw[:n]
                self.left -= n
                if self.phase == "data" and not self.left:
                    self.phase = "crlf" if self.chunked else "end"
            elif self.phase == "crlf":
                if len(raw) < 2:
                    break
                if raw[:2] != b"\r\n":
                    raise BodyCut("a chunk of the body is longer than its size says")
                del raw[:2]
                self.phase = "size"
            elif self.phase in ("size", "trailer"):
                end = raw.find(b"\n")
                if end < 0:
                    if len(raw) > self.MAX_LINE:
                        raise BodyCut("a chunk size line is too long")
                    break
                line = bytes(raw[:end]).strip()
                del raw[:end + 1]
                if self.phase == "trailer":
                    if not line:
                        self.phase = "end"
                    continue
                try:
                    size = int(line.split(b";", 1)[0], 16)
                except ValueError:
                    raise BodyCut("a chunk size is not a number") from None
                self.phase, self.left = ("data", size) if size > 0 else ("trailer", 0)
            else:  # end: whatever follows is not this body's
                break
        return b"".join(out)


def _take_body(r):
    """The body of requests' streamed response `r`, to read ourselves (Body).

    http.client has read the headers through a buffer, which may hold the
    body's first bytes: those are taken out of it (peeking with the socket
    non-blocking, so nothing waits), and from then on everything comes from
    the socket. chunks() hands the connection back to urllib3's pool after a
    whole body, as if http.client had read it."""
    fp = r.raw._fp.fp
    sock = fp.raw._sock   # the connection's own may be gone already: an answer with "Connection: close"
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        head = fp.peek()
        if head:
            fp.read1(len(head))
    finally:
        sock.settimeout(timeout)   # Body keeps it: restored when the connection goes back to the pool
    length = r.headers.get("Content-Length")
    chunked = "chunked" in r.headers.get("Transfer-Encoding", "").lower()
    try:
        length = None if chunked or length is None else int(length)
    except ValueError:
        length = None
    return Body(sock, head, chunked, length)


# --- the client ---------------------------------------------------------------

# requests.post returns only once the upstream sent its headers, which a busy
# server (llama.cpp behind its lock) may hold back for minutes; until then there
# is no response to close. So the connection a Call sends on, new or taken from
# the pool, hands its socket to the Call being sent from this thread, and
# abort() can shut it down.
_sending = threading.local()


class _ReportedSocket:
    def _new_conn(self):
        sock = super()._new_conn()
        call = getattr(_sending, "call", None)
        if call is not None:
            call._connected(sock, reused=False)
        return sock

    def request(self, *args, **kwargs):
        call = getattr(_sending, "call", None)
        if call is not None and self.sock is not None:  # a kept-alive connection from the pool
            call._connected(self.sock, reused=True)
        return super().request(*args, **kwargs)


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = type("HTTPConnection", (_ReportedSocket, urllib3.connection.HTTPConnection), {})


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = type("HTTPSConnection", (_ReportedSocket, urllib3.connection.HTTPSConnection), {})


POOL_SIZE = 64   # kept-alive upstream connections per host; more at once are opened and closed


def _session():
    """A requests session whose connections report their socket. One per
    Upstream, shared by its calls' threads: its pool keeps connections alive
    between turns (no connection set-up on a turn's path), and making a
    session per call cost more CPU than the call's other work. It keeps no
    cookies, so calls share nothing but connections."""
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=POOL_SIZE)
    adapter.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
    session = requests.Session()
    # The environment's proxy settings are read once (Upstream.proxies): requests
    # would read them, and look for a .netrc, on every call.
    session.trust_env = False
    session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class Upstream:
    def __init__(self, config):
        self.url = config["LLM_URL"].rstrip("/")
        self.shown_url = without_credentials(self.url)   # never show user:password@
        self.protocol = config["LLM_PROTOCOL"]
        self.model = config["LLM_MODEL"]
        self.api_key = config["LLM_API_KEY"]
        self.connect_timeout = float(config["LLM_CONNECT_TIMEOUT"])
        self.first_token_timeout = float(config["LLM_FIRST_TOKEN_TIMEOUT"])
        self.retries = int(config["LLM_CONNECT_RETRIES"])
        self.health_timeout = float(config["HEALTH_TIMEOUT"])
        self.session = _session()
        self.proxies = requests.utils.get_environ_proxies(self.url)   # honours NO_PROXY

    def headers(self):
        headers = {"Accept-Encoding": "identity"}  # compressed SSE would be held back
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def request(self, messages, options, stream):
        """(url, json body) for one chat request."""
        if self.protocol == "openai":
            body = {"messages": messages, "stream": stream,
                    "max_tokens": options["max_new_tokens"], "temperature": options["temperature"]}
            if self.model:
                body["model"] = self.model
            if stream:
                body["stream_options"] = {"include_usage": True}
            return f"{self.url}/v1/chat/completions", body
        body = {"messages": messages, **options}
        return f"{self.url}/chat/stream" if stream else f"{self.url}/chat", body

    def call(self, messages, options, stream=True):
        return Call(self, messages, options, stream)

    def health(self):
        """Ask the upstream's health endpoint; never waits longer than health_timeout."""
        path = "/v1/models" if self.protocol == "openai" else "/health"
        started = time.monotonic()
        result = {"url": self.shown_url, "protocol": self.protocol}
        try:
            r = requests.get(self.url + path, headers=self.headers(), timeout=self.health_timeout)
            result["latency_ms"] = round((time.monotonic() - started) * 1000, 1)
            body = r.json() if r.headers.get("Content-Type", "").startswith("application/json") else {}
            if not isinstance(body, dict):  # a list, a string, null: nothing to read in it
                body = {}
            result["ok"] = r.ok and body.get("model_loaded", True) is not False
            result["status_code"] = r.status_code
            if body.get("standin"):
                result["standin"] = True
        except requests.RequestException as e:
            result.update(ok=False, latency_ms=None, error=type(e).__name__)
        return result


class Call:
    """One chat request upstream: open() then chunks() in one thread, abort() in any."""

    def __init__(self, upstream, messages, options, stream):
        self.upstream, self.stream = upstream, stream
        self.url, self.body = upstream.request(messages, options, stream)
        self._lock = threading.Lock()
        self._response = None
        self._socket = None     # the connection's socket, before there is a response
        self._reused = False    # that connection came from the pool
        self._aborted = False
        self._finished = False  # the connection went back to the pool or was closed: abort() must not touch it
        self._body = self._parser = None   # a streamed answer's body and its events (open())
        self._over, self._failure = False, None   # read() came to the end; the error it ends with
        self._seen = {"finish_reason": None, "typed": False, "completed": False, "usage": None, "counted": None}

    def _connected(self, sock, reused):
        with self._lock:
            self._socket, self._reused = sock, reused
            aborted = self._aborted
        if aborted:
            _shutdown(sock)

    def _post(self):
        up = self.upstream
        timeout = (up.connect_timeout, up.first_token_timeout)
        for attempt in range(up.retries + 1):
            try:
                return self._send(timeout)
            except requests.ConnectTimeout:
                raise UpstreamTimeout(f"Connecting to the LLM server took longer than {up.connect_timeout:g} s.")
            except requests.ConnectionError as e:
                if self._aborted:
                    raise UpstreamCut("The request was aborted.") from None
                if self._reused and isinstance(e.args[0], urllib3.exceptions.ProtocolError):
                    # The server closed a kept-alive connection as we sent on it: it never
                    # saw the request. Once more, on a new connection (the pool dropped that one).
                    self._reused = False
                    try:
                        return self._send(timeout)
                    except requests.ConnectionError:
                        if self._aborted:
                            raise UpstreamCut("The request was aborted.") from None
                        log.warning("LLM server %s cannot be reached: %s", up.shown_url, "a kept-alive connection and a new one failed")
                        raise UpstreamUnavailable("The LLM server cannot be reached.") from None
                # Nothing was sent yet, so a refused connection is safe to retry.
                if attempt == up.retries or isinstance(e.args[0], urllib3.exceptions.ProtocolError):
                    log.warning("LLM server %s cannot be reached: %s", up.shown_url, type(e).__name__)
                    raise UpstreamUnavailable("The LLM server cannot be reached.")
                time.sleep(0.25 * 2 ** attempt)
            except requests.ReadTimeout:
                raise UpstreamTimeout("The LLM server did not answer in time.")

    def _send(self, timeout):
        _sending.call = self
        try:
            return self.upstream.session.post(self.url, json=self.body, headers=self.upstream.headers(),
                                              proxies=self.upstream.proxies, stream=True, timeout=timeout)
        finally:
            _sending.call = None

    def _check_status(self, r):
        """An error status becomes our typed error. The upstream's own words go
        to the log, never to the client: they may carry its internals (paths,
        versions, other users' text, credentials)."""
        if r.ok:
            return
        try:
            body = r.json()
        except ValueError:  # e.g. llama.cpp's text/plain "Internal Server Error"
            body = None
        if isinstance(body, dict):
            detail = _error_detail(body.get("error") or body.get("detail") or body)
        else:
            detail = r.text[:ERROR_BODY_LOGGED].strip() or r.reason
        up = self.upstream
        log.warning("LLM server %s answered %s: %s", up.shown_url, r.status_code,
                    redacted(detail[:ERROR_BODY_LOGGED], up.api_key))
        error = {503: UpstreamUnavailable, 504: UpstreamTimeout, 408: UpstreamTimeout}.get(
            r.status_code, UpstreamError)
        raise error(f"The LLM server answered with an error (HTTP {r.status_code}).")

    def open(self):
        """Send the request; returns once the upstream accepted it (status 2xx)."""
        r = self._post()
        with self._lock:
            self._response = r
            aborted = self._aborted
        if aborted:  # the turn ended while we waited for the answer's headers
            self._close(r)
            raise UpstreamCut("The request was aborted.")
        try:
            self._check_status(r)
            if self.stream:
                self._body, self._parser = _take_body(r), SSEParser()
        except UpstreamError:
            self._close(r)
            raise
        except (AttributeError, OSError):  # no socket to read (a closed connection)
            self._close(r)
            raise UpstreamCut("The LLM server broke off the answer.") from None

    def read(self, timeout=None):
        """The answer's Chunks (after open()) that arrive within `timeout`
        seconds (None: however long it takes): [] when none did, None once
        the answer is over. An error comes after the chunks that arrived
        before it, at the next read. (An answer not streamed is read whole.)"""
        if self._failure is not None:
            error, self._failure = self._failure, None
            raise error
        if self._over:
            return None
        if not self.stream:
            self._over = True
            return [self.whole()]
        chunks = []
        try:
            raw = self._body.read(timeout)
            events = self._parser.feed(raw) if raw else []
            done = self._body.ended
            if done:
                events += self._parser.feed(b"")
            for data in events:
                chunk = parse_event(data)
                if chunk is None:   # [DONE]
                    self._drain()
                    done = True
                    break
                self._note(chunk)
                chunks.append(chunk)
            if not done:
                return chunks
            chunks += self._last_chunks()
            self._over = True
            self._close(self._response, reuse=self._body.ended)
        except UpstreamError as e:
            self._end_with(e)
        except (BodyCut, OSError, ValueError) as e:
            if self._aborted:
                self._end_with(None)
            elif isinstance(e, socket.timeout):
                self._end_with(UpstreamTimeout("The LLM server stopped sending in time."))
            else:
                self._end_with(UpstreamCut("The LLM server broke off the answer."))
        return chunks

    def _end_with(self, error):
        """The answer is over, with `error` (raised at the next read) or none (an abort)."""
        self._over, self._failure = True, error
        self._close(self._response)

    def _note(self, chunk):
        seen = self._seen
        seen["finish_reason"] = chunk.finish_reason or seen["finish_reason"]
        seen["typed"] = seen["typed"] or chunk.kind is not None
        seen["completed"] = seen["completed"] or chunk.kind == "complete"
        seen["usage"] = chunk.usage or seen["usage"]
        if chunk.completion_tokens is not None:
            seen["counted"] = chunk.completion_tokens

    def _last_chunks(self):
        """At the end of a stream: what it lacked, inferred, or the error of a stream that ended too soon."""
        seen, midm = self._seen, self.upstream.protocol == "midm"
        if not midm and seen["finish_reason"] is None:
            # e.g. llama.cpp ends an interrupted stream with [DONE] but no finish_reason
            raise UpstreamCut("The LLM server ended the stream without a finish_reason.")
        if seen["typed"] and not seen["completed"]:
            # midm_LLM_serving always ends an answer with `complete` (or `error`)
            raise UpstreamCut("The LLM server ended the stream without its complete event.")
        if midm:
            inferred = midm_finish_reason(seen["usage"], self.body.get("max_new_tokens"), seen["counted"])
            if seen["finish_reason"] is None or inferred == "length":
                return [Chunk(finish_reason=inferred)]
        return []

    def _drain(self):
        """After the last event: read the rest of the body if it comes at once
        (the end of a chunked body), so that the connection can be kept.
        An upstream that sends more, or holds its body open, loses it."""
        deadline, left = time.monotonic() + DRAIN_SECONDS, DRAIN_BYTES
        try:
            while not self._body.ended and left > 0:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    break
                left -= len(self._body.read(wait))
        except (BodyCut, OSError):
            pass

    def chunks(self):
        """Yield the answer's Chunks as they arrive (after open()), blocking."""
        while (chunks := self.read()) is not None:
            yield from chunks

    def whole(self):
        """The one Chunk of an answer that was not streamed (after open())."""
        r, whole = self._response, False
        try:
            try:
                body = r.json()
            except ValueError:
                raise UpstreamError("The LLM server's answer is not JSON.") from None
            whole = True
            chunk = parse_whole(self.upstream.protocol, body)
            if self.upstream.protocol == "midm" and not body.get("finish_reason"):
                chunk.finish_reason = midm_finish_reason(chunk.usage, self.body.get("max_new_tokens"),
                                                         chunk.completion_tokens)
            return chunk
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
            if self._aborted:
                raise UpstreamCut("The request was aborted.") from None
            if isinstance(e, (requests.Timeout, urllib3.exceptions.ReadTimeoutError, socket.timeout)):
                raise UpstreamTimeout("The LLM server stopped sending in time.") from None
            raise UpstreamCut("The LLM server broke off the answer.") from None
        finally:
            self._close(r, reuse=whole)

    def _close(self, r, reuse=False):
        """Give the connection back to the pool (a body read whole) or close it.
        Under the lock: abort() must never shut down a connection another call took from the pool."""
        with self._lock:
            self._finished = True
            try:
                if reuse and not self._aborted and r.headers.get("Connection", "").lower() != "close":
                    # http.client must count its response over (we read the body
                    # ourselves, Body) before the connection takes another request.
                    r.raw._fp.close()
                    if self._body is not None:
                        self._body.sock.settimeout(self._body.timeout)   # as urllib3 left it
                    r.raw.release_conn()
                else:
                    r.close()
            except Exception:  # noqa: BLE001 - closing must not mask the outcome
                log.debug("closing the upstream response failed", exc_info=True)

    def abort(self):
        """Close the upstream connection now, waking a read blocked on it,
        or requests.post still waiting for the answer's headers."""
        with self._lock:
            self._aborted = True
            if self._finished:
                return
            r, sock = self._response, self._socket
            if r is not None:
                try:
                    r.raw.shutdown()  # shuts the socket down: the blocked read returns, chunks() closes it
                except (ValueError, RuntimeError, OSError):
                    pass  # already finished and released
            elif sock is not None:
                _shutdown(sock)


def _shutdown(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed
