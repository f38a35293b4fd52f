"""The seed's own system, through a real gunicorn: the stand-in playing
midm_LLM_serving's typed events (its default shape), and a client written for
the original backend reading our stream its way."""
import codecs
import json

import pytest
import requests
import websocket

from chatbot.standin import MARKER
from conftest import SSEStream
from helpers import deltas, stored_messages

# What the original backend's web client sends with every chat (lib/api.ts there).
ORIGINAL_OPTIONS = {"max_new_tokens": 256, "temperature": 0.7, "do_sample": True, "use_rag": False, "top_k": 5}


@pytest.fixture
def server(live_server):
    return live_server


def words(n):
    return MARKER + "".join(f"단어{i} " for i in range(1, n + 1))


def read_as_the_original_client(url, body):
    """Read a stream the way the original backend's web client does: `data: `
    lines only (event: and id: lines mean nothing to it), JSON objects told
    apart by `type`, the end at `data: [DONE]`. Returns (objects, text shown,
    whether [DONE] came, what the server sent after it)."""
    response = requests.post(url + "/api/chat/stream", json=body, stream=True, timeout=30)
    assert response.status_code == 200, response.text
    decoder = codecs.getincrementaldecoder("utf-8")()
    objects, shown, buffer = [], "", ""
    chunks = response.iter_content(chunk_size=None)
    for data in chunks:
        *lines, buffer = (buffer + decoder.decode(data)).split("\n")
        for line in lines:
            if not line.startswith("data: "):
                continue
            if line[6:].strip() == "[DONE]":
                rest = buffer + "".join(decoder.decode(d) for d in chunks)
                return objects, shown, True, rest
            obj = json.loads(line[6:])
            objects.append(obj)
            if obj["type"] == "token" and obj["content"]:
                shown += obj["content"]
    return objects, shown, False, ""


def test_a_client_of_the_original_backend_gets_exactly_the_stored_reply(server):
    sid = server.new_session()
    message = "안녕하세요, 자기소개 해 주세요. @@words=6"
    objects, shown, done, after = read_as_the_original_client(
        server.url, {"session_id": sid, "message": message, **ORIGINAL_OPTIONS})
    assert [o["type"] for o in objects] == ["start"] + ["token"] * 6 + ["complete"]
    assert done and after == ""   # [DONE] is the last line of the body
    user, reply = stored_messages(server.db_path, sid)
    assert shown == reply["content"] == words(6) and reply["status"] == "complete"
    assert objects[-1]["content"] == shown and objects[-1]["message_id"] == reply["message_id"]
    assert user["content"] == message


def test_a_client_of_the_original_backend_sees_an_error_with_its_message(server):
    sid = server.new_session()
    objects, shown, done, after = read_as_the_original_client(
        server.url, {"session_id": sid, "message": "오류 @@words=5 @@error=2", **ORIGINAL_OPTIONS})
    error = objects[-1]
    assert [o["type"] for o in objects] == ["start", "token", "token", "error"] and done and after == ""
    assert "stand-in error requested" in error["message"] and error["message"] == error["detail"]
    reply = stored_messages(server.db_path, sid)[-1]
    assert shown == reply["content"] == words(2) and reply["status"] == "incomplete"


def stream(server, sid, message, **options):
    return SSEStream(server.url, "/api/chat/stream", {"session_id": sid, "message": message, **options})


def test_midm_llm_servings_error_mid_answer_is_an_upstream_error_and_keeps_the_text(server):
    # the stand-in sends start, two chunks, {"type": "error", "message"} and ends its body normally
    sid = server.new_session()
    s = stream(server, sid, "안녕 @@words=5 @@error=2")
    events = list(s.events())
    assert [name for name, _, _ in events if name != "comment"] == ["start", "delta", "delta", "error"]
    error = events[-1][1]
    assert error["code"] == "upstream_error" and "stand-in error requested" in error["detail"]
    assert error["type"] == "error" and error["message"] == error["detail"]
    assert s.done_marker and s.raw.endswith(b"\n\ndata: [DONE]\n\n")
    reply = stored_messages(server.db_path, sid)[-1]
    assert reply["status"] == "incomplete" and reply["content"] == deltas(events) == words(2)
    assert json.loads(reply["error"])["code"] == "upstream_error" and reply["message_id"] == error["message_id"]


def test_midm_llm_servings_error_before_any_text_is_a_failed_reply(server):
    sid = server.new_session()
    events = list(stream(server, sid, "@@words=5 @@error=0").events())
    assert events[-1][0] == "error" and events[-1][1]["code"] == "upstream_error"
    reply = stored_messages(server.db_path, sid)[-1]
    assert reply["status"] == "failed" and reply["content"] == ""


def test_midm_llm_servings_stream_without_its_complete_event_is_incomplete(server):
    sid = server.new_session()
    events = list(stream(server, sid, "@@words=3 @@nofinish").events())
    assert events[-1][0] == "error" and events[-1][1]["code"] == "upstream_error"
    reply = stored_messages(server.db_path, sid)[-1]
    assert reply["status"] == "incomplete" and reply["content"] == words(3)


def test_midm_llm_servings_whole_answer_and_its_usage(server, standin_log):
    sid = server.new_session()
    s = stream(server, sid, "한국어로 @@words=4 @@split", **ORIGINAL_OPTIONS)
    events = list(s.events())
    done = events[-1][1]
    assert events[-1][0] == "done" and done["type"] == "complete" and done["status"] == "complete"
    assert deltas(events) == done["content"] == words(4)   # `accumulated` is never appended
    usage = done["token_usage"]
    assert usage["completion_tokens"] == 4 and usage["estimated_fields"] == ["prompt_tokens", "total_tokens"]
    assert "estimated" not in usage and usage["total_tokens"] == usage["prompt_tokens"] + 4
    # the options of the original client reach the LLM server; use_rag and top_k do not
    sent = standin_log()[-1]["body"]
    assert (sent["max_new_tokens"], sent["temperature"], sent["do_sample"]) == (256, 0.7, True)
    assert "use_rag" not in sent and "top_k" not in sent


def test_the_websocket_takes_the_original_clients_options(server):
    sid = server.new_session()
    ws = websocket.create_connection(server.url.replace("http", "ws") + "/api/chat/ws", timeout=15)
    try:
        ws.send(json.dumps({"type": "chat", "session_id": sid, "message": "웹소켓 @@words=2", **ORIGINAL_OPTIONS}))
        frames = [json.loads(ws.recv())]
        while frames[-1]["type"] not in ("done", "error"):
            frames.append(json.loads(ws.recv()))
        assert frames[-1]["type"] == "done" and frames[-1]["message"]["content"] == words(2)
        ws.send(json.dumps({"type": "chat", "session_id": sid, "message": "hi", "use_rag": True}))
        error = json.loads(ws.recv())
        assert error["type"] == "error" and error["code"] == "validation_error"
        assert error["errors"][0]["field"] == "use_rag" and "retrieval" in error["errors"][0]["detail"]
    finally:
        ws.close()
