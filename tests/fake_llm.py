"""An LLM server inside the test process, for tests that are not about HTTP
streaming (after simonw/llm's MockModel): it answers at once, and with what a
test queued for it, so no directive rides in the user's message (and from
there into stored titles).

    def test_x(client, session_id, fake_llm):
        fake_llm.enqueue(["Bonjour", " !"])
        client.post("/api/chat", json={"session_id": session_id, "message": "Hello"})
        assert fake_llm.requests[-1]["messages"][-1]["content"] == "Hello"

Without a queued answer it says "ok". It stands in for chatbot.llm.Upstream:
call() gives a Call with open(), read(), chunks() and abort().
"""
from collections import deque

from chatbot.llm import Chunk


class FakeLLM:
    def __init__(self):
        self.queue = deque()
        self.requests = []   # each call's messages, options and stream flag, in order

    def enqueue(self, pieces, finish_reason="stop", usage=None, error=None):
        """The next answer: its text pieces, then its finish reason and usage
        (None: the service estimates it); or `error` (a chatbot.llm.UpstreamError)
        raised when the call is opened."""
        self.queue.append((list(pieces), finish_reason, usage, error))

    def call(self, messages, options, stream=True):
        self.requests.append({"messages": messages, "options": options, "stream": stream})
        answer = self.queue.popleft() if self.queue else (["ok"], "stop", None, None)
        return FakeCall(stream, *answer)

    def health(self):
        return {"url": "fake://", "protocol": "fake", "ok": True, "latency_ms": 0.0, "status_code": 200}


class FakeCall:
    def __init__(self, stream, pieces, finish_reason, usage, error):
        self.stream = stream
        self.pieces, self.finish_reason, self.usage, self.error = pieces, finish_reason, usage, error
        self.aborted = self.over = False

    def open(self):
        if self.error is not None:
            raise self.error

    def chunks(self):
        if not self.stream:
            yield Chunk("".join(self.pieces), self.usage, self.finish_reason)
            return
        for piece in self.pieces:
            if self.aborted:
                return
            yield Chunk(piece)
        yield Chunk("", self.usage, self.finish_reason)

    def read(self, timeout=None):
        """The whole answer's chunks at the first read; None (the end) after."""
        if self.over:
            return None
        self.over = True
        return list(self.chunks())

    def abort(self):
        self.aborted = True
