"""The openai adapter on answers recorded from a real llama.cpp server
(tests/data/llama_cpp/README.md says what each file is)."""
import json
from pathlib import Path

import pytest
import requests

from chatbot import llm
from helpers import ScriptedSocket

DATA = Path(__file__).parent / "data" / "llama_cpp"
CONFIG = {"LLM_URL": "http://llama.invalid", "LLM_PROTOCOL": "openai", "LLM_MODEL": "smollm2",
          "LLM_API_KEY": None, "LLM_CONNECT_TIMEOUT": 5, "LLM_FIRST_TOKEN_TIMEOUT": 120,
          "LLM_CONNECT_RETRIES": 0, "HEALTH_TIMEOUT": 2}
OPTIONS = {"max_new_tokens": 8, "temperature": 0, "do_sample": False}


class Replay:
    """The raw body of a response, handed out `size` bytes per read as the network would."""

    def __init__(self, body, size):
        self.body, self.size = body, size

    def read1(self, n=-1):
        piece, self.body = self.body[:self.size], self.body[self.size:]
        return piece

    def read(self, n=-1, **kwargs):
        piece, self.body = (self.body, b"") if n is None or n < 0 else (self.body[:n], self.body[n:])
        return piece

    def close(self):
        pass


def recorded(name, status=200, content_type="text/event-stream; charset=utf-8", size=65536):
    response = requests.Response()
    response.status_code = status
    response.reason = {200: "OK", 400: "Bad Request", 500: "Internal Server Error"}[status]
    response.headers["Content-Type"] = content_type
    response.raw = Replay((DATA / name).read_bytes(), size)
    return response


def answer(monkeypatch, response, stream=True):
    """A Call whose request is answered with `response`, opened."""
    monkeypatch.setattr(llm.Call, "_send", lambda *args, **kwargs: response)
    monkeypatch.setattr(llm, "_take_body", lambda r: llm.Body(ScriptedSocket(r.raw.read1), b"", chunked=False, length=None))
    call = llm.Upstream(CONFIG).call([{"role": "user", "content": "Say hello."}], OPTIONS, stream=stream)
    call.open()
    return call


def text_of(name):
    """The answer's text, read from the recording without the adapter."""
    events = [line[6:] for line in (DATA / name).read_text().split("\n") if line.startswith("data: ")]
    return "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events if e != "[DONE]")


@pytest.mark.parametrize("size", [65536, 7])
def test_a_finished_stream_yields_its_text_and_finish_reason(monkeypatch, size):
    chunks = list(answer(monkeypatch, recorded("stream-stop.sse", size=size)).chunks())
    # The first chunk only says role "assistant": it carries no text.
    assert chunks[0].text == "" and chunks[0].finish_reason is None
    assert "".join(c.text for c in chunks) == text_of("stream-stop.sse") != ""
    # The last chunk has an empty delta and the finish_reason; no usage anywhere
    # (llama.cpp ignores stream_options.include_usage), so the backend estimates it.
    assert (chunks[-1].text, chunks[-1].finish_reason) == ("", "stop")
    assert all(c.usage is None for c in chunks)


def test_a_stream_cut_by_max_tokens_finishes_with_length(monkeypatch):
    chunks = list(answer(monkeypatch, recorded("stream-length.sse")).chunks())
    assert chunks[-1].finish_reason == "length"
    assert "".join(c.text for c in chunks) == text_of("stream-length.sse")


def test_an_interrupted_stream_ends_with_done_but_no_finish_reason_and_is_cut(monkeypatch):
    call = answer(monkeypatch, recorded("stream-interrupted.sse"))
    texts = []
    with pytest.raises(llm.UpstreamCut):
        for chunk in call.chunks():
            texts.append(chunk.text)
    assert "".join(texts) == text_of("stream-interrupted.sse") != ""


def test_an_empty_stream_is_cut_not_an_empty_answer(monkeypatch):
    # What llama.cpp streams when the prompt does not fit its context window.
    call = answer(monkeypatch, recorded("stream-over-context.sse"))
    with pytest.raises(llm.UpstreamCut):
        list(call.chunks())


def test_a_whole_answer_carries_the_servers_usage(monkeypatch):
    call = answer(monkeypatch, recorded("whole-length.json", content_type="application/json"), stream=False)
    [chunk] = list(call.chunks())
    body = json.loads((DATA / "whole-length.json").read_text())
    assert chunk.text == body["choices"][0]["message"]["content"] != ""
    assert chunk.finish_reason == "length"
    assert chunk.usage == {"prompt_tokens": 38, "completion_tokens": 8, "total_tokens": 46}


@pytest.mark.parametrize("name, status, content_type, detail", [
    ("error-500-validation.json", 500, "application/json", "500: 1 validation error"),
    ("error-500-broken-json.txt", 500, "text/plain; charset=utf-8", "500: Internal Server Error"),
    ("error-400-over-context.json", 400, "application/json", "400: This model's maximum context length"),
])
def test_error_answers_become_upstream_errors_with_the_servers_words_in_the_log(monkeypatch, caplog, name,
                                                                                 status, content_type, detail):
    with pytest.raises(llm.UpstreamError) as raised:
        answer(monkeypatch, recorded(name, status, content_type))
    assert type(raised.value) is llm.UpstreamError  # 502 upstream_error, not 503 or 504
    assert raised.value.status == 502 and raised.value.code == "upstream_error"
    # The client gets our sentence; the server's own words go to the log only.
    assert raised.value.detail == f"The LLM server answered with an error (HTTP {status})."
    assert detail in caplog.text


@pytest.mark.parametrize("body", [b'"model is loading"', b'["busy"]', b"null"])
def test_a_json_error_body_that_is_not_an_object_is_logged_as_text(monkeypatch, caplog, body):
    response = requests.Response()
    response.status_code, response.reason = 500, "Internal Server Error"
    response.headers["Content-Type"] = "application/json"
    response.raw = Replay(body, 65536)
    with pytest.raises(llm.UpstreamError) as raised:
        answer(monkeypatch, response)
    assert raised.value.detail == "The LLM server answered with an error (HTTP 500)."
    assert f"answered 500: {body.decode()}" in caplog.text
