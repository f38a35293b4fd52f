"""The upstream client (chatbot.llm.Upstream) against the real stand-in LLM
server: every stream form of CONTRACT.md, every failure, and text handed on
as soon as it arrives."""
import threading
import time

import pytest

from chatbot import DEFAULTS
from chatbot.llm import Upstream, UpstreamCut, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from chatbot.standin import MARKER
from conftest import wait_for

OPTIONS = {"max_new_tokens": 64, "temperature": 0.7, "do_sample": False}
WORDS3 = [MARKER + "단어1 ", "단어2 ", "단어3 "]


def upstream(url, protocol="midm", **config):
    return Upstream({**DEFAULTS, "LLM_URL": url, "LLM_PROTOCOL": protocol, "LLM_CONNECT_RETRIES": 0,
                     **config})


def call(up, text, stream=True):
    c = up.call([{"role": "user", "content": text}], OPTIONS, stream=stream)
    c.open()
    return c


def texts(chunks):
    return [c.text for c in chunks if c.text]


@pytest.mark.parametrize("fmt", ["token", "content", "text", "delta", "response", "openai", "plain"])
def test_every_midm_stream_form(standin, fmt):
    chunks = list(call(upstream(standin), f"@@words=3 @@format={fmt}").chunks())
    assert texts(chunks) == WORDS3  # one chunk a piece, nothing merged or lost


@pytest.mark.parametrize("protocol, fmt", [("midm", "token"), ("openai", "token")])
def test_usage_and_finish_reason(standin, protocol, fmt):
    chunks = list(call(upstream(standin, protocol), f"@@words=3 @@format={fmt}").chunks())
    usage = [c.usage for c in chunks if c.usage]
    assert texts(chunks) == WORDS3 and usage and usage[-1]["completion_tokens"] == 3
    if protocol == "openai":
        assert [c.finish_reason for c in chunks if c.finish_reason] == ["stop"]


def test_midm_llm_servings_own_events(standin):
    chunks = list(call(upstream(standin), "안녕 @@words=3").chunks())
    assert texts(chunks) == WORDS3   # `accumulated` is never taken as text
    assert [c.kind for c in chunks] == ["start", "chunk", "chunk", "chunk", "complete"]
    # its `total_tokens` counts the completion alone; it sends no usage
    assert [(c.completion_tokens, c.finish_reason, c.usage) for c in chunks if c.kind == "complete"] == [
        (3, "stop", None)]


def test_midm_llm_servings_stream_without_its_complete_event_is_cut(standin):
    received = []
    with pytest.raises(UpstreamCut):
        for chunk in call(upstream(standin), "@@words=3 @@nofinish").chunks():
            received.append(chunk.text)
    assert "".join(received) == "".join(WORDS3)


def test_a_midm_stream_without_done_is_complete(standin):
    assert texts(call(upstream(standin), "@@words=3 @@nodone").chunks()) == WORDS3


def test_korean_split_inside_characters_arrives_whole(standin):
    assert texts(call(upstream(standin), "@@words=3 @@split").chunks()) == WORDS3


@pytest.mark.parametrize("protocol, fmt", [("midm", "serving"), ("midm", "token"), ("openai", "token")])
def test_an_error_event_is_an_upstream_error(standin, protocol, fmt):
    received = []
    with pytest.raises(UpstreamError) as raised:
        for chunk in call(upstream(standin, protocol), f"@@words=5 @@error=2 @@format={fmt}").chunks():
            received.append(chunk.text)
    assert type(raised.value) is UpstreamError and "".join(received).endswith("단어2 ")
    assert raised.value.code == "upstream_error" and "stand-in error requested" in raised.value.detail


@pytest.mark.parametrize("protocol", ["midm", "openai"])
def test_a_stream_that_breaks_off_is_cut(standin, protocol):
    received = []
    with pytest.raises(UpstreamCut):
        for chunk in call(upstream(standin, protocol), "@@words=5 @@break=2").chunks():
            received.append(chunk.text)
    assert "".join(received).endswith("단어2 ")


@pytest.mark.parametrize("protocol", ["midm", "openai"])
@pytest.mark.parametrize("status, error", [(500, UpstreamError), (400, UpstreamError),
                                           (503, UpstreamUnavailable), (504, UpstreamTimeout)])
def test_an_error_status_is_raised_by_open(standin, protocol, status, error):
    with pytest.raises(error) as raised:
        call(upstream(standin, protocol), f"@@status={status}")
    assert type(raised.value) is error and str(status) in raised.value.detail


@pytest.mark.parametrize("protocol", ["midm", "openai"])
def test_a_whole_answer(standin, protocol):
    [chunk] = call(upstream(standin, protocol), "@@words=3", stream=False).chunks()
    assert chunk.text == "".join(WORDS3) and chunk.usage["completion_tokens"] == 3


def test_an_unreachable_server_is_unavailable():
    with pytest.raises(UpstreamUnavailable):
        call(upstream("http://127.0.0.1:9"), "hi")


def test_a_refused_connection_is_retried(standin):
    # Nothing was sent, so trying again is safe: the server may be restarting.
    up = upstream("http://127.0.0.1:9", LLM_CONNECT_RETRIES=2)
    started = time.monotonic()
    with pytest.raises(UpstreamUnavailable):
        call(up, "hi")
    assert time.monotonic() - started >= 0.25 + 0.5  # both back-offs were waited


def test_text_is_handed_on_while_the_upstream_is_still_generating(standin, standin_log):
    chunks = (c for c in call(upstream(standin), "@@words=6 @@delay=0.3").chunks() if c.text)
    assert next(chunks).text == WORDS3[0]
    [entry] = standin_log()
    assert entry["state"] == "running" and entry["pieces_sent"] < 6
    assert len(texts(chunks)) == 5


def test_abort_wakes_a_read_blocked_on_a_silent_upstream(standin, standin_log):
    c = call(upstream(standin), "@@first=30")
    threading.Timer(0.3, c.abort).start()
    started = time.monotonic()
    assert texts(c.chunks()) == []  # an aborted call ends quietly
    assert time.monotonic() - started < 5


def test_abort_closes_the_upstream_connection(standin, standin_log):
    c = call(upstream(standin), "@@words=100 @@delay=0.05")
    chunks = c.chunks()
    next(chunk for chunk in chunks if chunk.text)
    c.abort()
    assert list(chunks) == []
    assert wait_for(lambda: standin_log()[-1]["state"] == "cancelled", timeout=5)


@pytest.mark.parametrize("protocol", ["midm", "openai"])
@pytest.mark.parametrize("stream", [True, False])
def test_abort_closes_a_request_still_waiting_for_the_answers_headers(standin, standin_log, protocol, stream):
    c = upstream(standin, protocol).call([{"role": "user", "content": "@@headers=30"}], OPTIONS, stream=stream)

    def abort_once_sent():
        wait_for(standin_log, timeout=10)   # the upstream has the request, and holds its headers back
        c.abort()
    threading.Thread(target=abort_once_sent, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(UpstreamCut):
        c.open()
    assert time.monotonic() - started < 15
    # The upstream saw the connection close: the request left its queue.
    assert wait_for(lambda: standin_log()[-1]["state"] == "cancelled", timeout=5)


def test_midm_llm_servings_500_with_detail_is_an_upstream_error_with_its_words_in_the_log(standin, caplog):
    # its /chat answers a failure as HTTP 500 {"detail": "<why>"}
    with pytest.raises(UpstreamError) as raised:
        call(upstream(standin), "@@error=0", stream=False)
    assert type(raised.value) is UpstreamError
    # The client gets our sentence; the server's words go to our log only.
    assert raised.value.detail == "The LLM server answered with an error (HTTP 500)."
    assert "answered 500: stand-in error requested" in caplog.text
