"""Unit tests of the upstream stream parsing: chatbot.llm.sse_data and parse_event."""
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatbot.llm import Chunk, UpstreamError, parse_event, parse_whole, sse_data

KOREAN = ["안녕하세요", "반갑습니다 😀", "한국어 텍스트"]
STREAM = "".join(f'data: {json.dumps({"token": t}, ensure_ascii=False)}\n\n' for t in KOREAN).encode()


def reader(*reads):
    """A read() that returns these byte strings one by one, then b"" (the end)."""
    parts = iter(reads)
    return lambda: next(parts, b"")


def data_of(*reads):
    return list(sse_data(reader(*reads)))


def test_korean_fed_byte_by_byte_comes_out_whole():
    one_byte_reads = [STREAM[i:i + 1] for i in range(len(STREAM))]
    assert [json.loads(d)["token"] for d in data_of(*one_byte_reads)] == KOREAN


@given(st.lists(st.integers(0, len(STREAM)), max_size=30))
def test_any_split_of_the_bytes_gives_the_same_events(cuts):
    cuts = sorted(set(cuts) | {0, len(STREAM)})
    reads = [STREAM[a:b] for a, b in zip(cuts, cuts[1:])]
    assert data_of(*[r for r in reads if r]) == data_of(STREAM)


def test_each_event_is_yielded_before_the_next_read():
    reads = iter([b"data: first\n\ndata: sec", b"ond\n\n"])

    def read():  # a third read would block on a real socket until the upstream says more
        data = next(reads, None)
        assert data is not None, "read past a complete event"
        return data
    events = sse_data(read)
    assert next(events) == "first"
    assert next(events) == "second"


def test_line_endings_comments_fields_and_multi_line_data():
    assert data_of(b": keep-alive\r\n\r\nid: 7\r\nevent: delta\r\ndata: a\r\ndata:b\r\n\r\nretry: 5\n\n") == ["a\nb"]


def test_a_last_event_without_its_blank_line_is_kept():
    assert data_of(b"data: one\n\ndata: two\n") == ["one", "two"]
    assert data_of(b"data: one\n\ndata: two") == ["one", "two"]
    assert data_of() == []


def test_invalid_utf8_is_replaced_not_fatal():
    assert data_of(b"data: \xff\xfe ok\n\n") == ["\ufffd\ufffd ok"]


@pytest.mark.parametrize("field", ["token", "content", "text", "delta", "response"])
def test_every_midm_text_field(field):
    assert parse_event(json.dumps({field: "안녕"})) == Chunk("안녕")


def test_openai_chunks_and_usage():
    assert parse_event('{"choices": [{"delta": {"content": "hi"}, "finish_reason": null}]}') == Chunk("hi")
    assert parse_event('{"choices": [{"delta": {}, "finish_reason": "stop"}]}') == Chunk("", None, "stop")
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    assert parse_event(json.dumps({"choices": [], "usage": usage})) == Chunk("", usage)
    assert parse_event(json.dumps({"usage": usage})) == Chunk("", usage)


def test_plain_text_and_json_strings():
    assert parse_event("그냥 텍스트") == Chunk("그냥 텍스트")
    assert parse_event('"quoted"') == Chunk("quoted")
    assert parse_event("42") == Chunk("42")
    assert parse_event('{"token": null}') == Chunk("")


@pytest.mark.parametrize("data", ["[DONE]", " [DONE] "])
def test_done_ends_the_stream(data):
    assert parse_event(data) is None


@pytest.mark.parametrize("error", ["overloaded", {"message": "overloaded", "type": "server_error"}])
def test_an_error_field_is_an_upstream_error(error):
    with pytest.raises(UpstreamError, match="overloaded") as raised:
        parse_event(json.dumps({"error": error}))
    assert raised.value.status == 502 and raised.value.code == "upstream_error"


def test_whole_answers():
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    assert parse_whole("midm", {"response": "안녕", "usage": usage}) == Chunk("안녕", usage, "stop")
    openai = {"choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "length"}]}
    assert parse_whole("openai", openai) == Chunk("hi", None, "length")
    for bad in ([], {"no": "text"}, {"error": "boom"}):
        with pytest.raises(UpstreamError):
            parse_whole("midm", bad)


# midm_LLM_serving's own events, as its /chat/stream sends them

def test_its_start_carries_no_text():
    assert parse_event('{"type": "start", "message": "Stream started"}') == Chunk("", kind="start")


def test_its_chunk_gives_content_and_never_accumulated():
    event = {"type": "chunk", "content": "세요", "accumulated": "안녕하세요", "token_count": 2}
    assert parse_event(json.dumps(event, ensure_ascii=False)) == Chunk("세요", kind="chunk")


def test_its_complete_carries_no_text_and_counts_the_completion():
    event = {"type": "complete", "full_response": "안녕하세요", "total_tokens": 2}
    assert parse_event(json.dumps(event, ensure_ascii=False)) == Chunk(
        "", None, "stop", completion_tokens=2, kind="complete")
    # a count that is no count is left out (we estimate instead)
    for bad in ("2", -1, True, None):
        assert parse_event(json.dumps({**event, "total_tokens": bad})).completion_tokens is None


@pytest.mark.parametrize("data", [
    '{"type": "error", "message": "CUDA out of memory. 메모리 부족"}',
    # ASCII-escaped, as that server's json.dumps sends it
    '{"type": "error", "message": "CUDA out of memory. \\uba54\\ubaa8\\ub9ac \\ubd80\\uc871"}',
])
def test_its_error_is_an_upstream_error_with_its_message(data):
    with pytest.raises(UpstreamError) as raised:
        parse_event(data)
    assert raised.value.code == "upstream_error" and raised.value.status == 502
    assert raised.value.detail == "The LLM server reported an error: CUDA out of memory. 메모리 부족"


def test_a_type_it_does_not_send_is_read_as_any_other_object():
    assert parse_event('{"type": "token", "content": "hi"}') == Chunk("hi")
