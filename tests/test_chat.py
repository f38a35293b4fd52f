"""A chat turn answered as one JSON message, and what is stored with the reply
(Flask test client against the real stand-in LLM server)."""
import json

import pytest

from chatbot import context
from chatbot.standin import MARKER
from helpers import sse_events, stored_messages

WORDS3 = MARKER + "단어1 단어2 단어3 "


def standin_usage(messages, pieces):
    """The usage the stand-in reports (see chatbot/standin.py)."""
    prompt = sum(len(m["content"]) // 2 + 1 for m in messages)
    return {"prompt_tokens": prompt, "completion_tokens": pieces, "total_tokens": prompt + pieces}


def test_a_chat_answers_the_stored_assistant_message(app, client, session_id, standin_log):
    response = client.post("/api/chat", json={"session_id": session_id, "message": "hi @@words=3"})
    assert response.status_code == 200
    reply = response.json
    assert reply["role"] == "assistant" and reply["content"] == WORDS3
    assert reply["status"] == "complete" and reply["finish_reason"] == "stop"
    assert reply["token_usage"] == standin_usage(standin_log()[-1]["body"]["messages"], 3)
    user, stored = client.get(f"/api/sessions/{session_id}/messages").json["messages"]
    assert stored == reply
    assert user["content"] == "hi @@words=3" and user["status"] == "complete"


def test_a_stream_stores_the_upstreams_usage(client, session_id, standin_log):
    response = client.post("/api/chat/stream", json={"session_id": session_id,
                                                     "message": "hi @@words=3 @@format=token"})
    done = sse_events(response.get_data())[-1]
    assert done[0] == "done"
    assert done[1]["token_usage"] == standin_usage(standin_log()[-1]["body"]["messages"], 3)


def test_midm_llm_servings_total_tokens_is_the_completions_count(app, client, session_id, standin_log):
    # midm_LLM_serving sends no usage, only `total_tokens` (the reply's) in its `complete` event
    response = client.post("/api/chat/stream", json={"session_id": session_id, "message": "안녕 @@words=4"})
    name, done = sse_events(response.get_data())[-1]
    sent = standin_log()[-1]["body"]["messages"]
    assert name == "done" and done["token_usage"] == {
        "prompt_tokens": context.count_tokens(sent), "completion_tokens": 4,
        "total_tokens": context.count_tokens(sent) + 4, "estimated_fields": ["prompt_tokens", "total_tokens"]}
    stored = stored_messages(app.config["DATABASE"], session_id)[-1]
    assert json.loads(stored["token_usage"]) == done["token_usage"]


def test_without_the_upstreams_usage_an_estimate_is_stored_and_marked(app, client, session_id, standin_log):
    response = client.post("/api/chat/stream",
                           json={"session_id": session_id, "message": "hi @@words=3 @@nousage"})
    usage = sse_events(response.get_data())[-1][1]["token_usage"]
    sent = standin_log()[-1]["body"]["messages"]
    assert usage == {"prompt_tokens": context.count_tokens(sent), "completion_tokens": 3,
                     "total_tokens": context.count_tokens(sent) + 3, "estimated": True}
    stored = stored_messages(app.config["DATABASE"], session_id)[-1]
    assert json.loads(stored["token_usage"]) == usage and stored["status"] == "complete"


def test_generation_options_reach_the_upstream_within_their_defaults(app, client, session_id, standin_log):
    client.post("/api/chat", json={"session_id": session_id, "message": "hi @@words=1"})
    body = standin_log()[-1]["body"]
    assert (body["max_new_tokens"], body["temperature"], body["do_sample"]) == (
        app.config["DEFAULT_MAX_NEW_TOKENS"], app.config["DEFAULT_TEMPERATURE"], False)
    client.post("/api/chat", json={"session_id": session_id, "message": "hi @@words=5",
                                   "max_new_tokens": 2, "temperature": 0.1, "do_sample": True})
    body = standin_log()[-1]["body"]
    assert (body["max_new_tokens"], body["temperature"], body["do_sample"]) == (2, 0.1, True)


@pytest.fixture
def openai_client(make_app):
    return make_app(LLM_PROTOCOL="openai", LLM_MODEL="midm-2.0-mini", LLM_API_KEY="k-123").test_client()


@pytest.mark.parametrize("path", ["/api/chat", "/api/chat/stream"])
def test_the_openai_protocol(openai_client, standin_log, path):
    client = openai_client
    session_id = client.post("/api/sessions").json["session_id"]
    response = client.post(path, json={"session_id": session_id, "message": "hi @@words=3",
                                       "max_new_tokens": 2})
    reply = response.json if path == "/api/chat" else sse_events(response.get_data())[-1][1]
    assert reply["content"] == MARKER + "단어1 단어2 " and reply["finish_reason"] == "length"
    assert reply["status"] == "complete" and "estimated" not in reply["token_usage"]
    request = standin_log()[-1]
    assert request["path"] == "/v1/chat/completions" and request["authorization"] == "Bearer k-123"
    assert request["body"]["model"] == "midm-2.0-mini" and request["body"]["max_tokens"] == 2
    assert request["body"]["stream"] == (path == "/api/chat/stream")


def test_an_openai_stream_without_finish_reason_is_incomplete(openai_client):
    # llama.cpp ends a stream it cut short with [DONE] but no finish_reason.
    client = openai_client
    session_id = client.post("/api/sessions").json["session_id"]
    response = client.post("/api/chat/stream", json={"session_id": session_id,
                                                     "message": "hi @@words=3 @@nofinish"})
    name, error = sse_events(response.get_data())[-1]
    assert name == "error" and error["code"] == "upstream_error"
    reply = client.get(f"/api/sessions/{session_id}/messages").json["messages"][-1]
    assert reply["status"] == "incomplete" and reply["content"] == WORDS3
