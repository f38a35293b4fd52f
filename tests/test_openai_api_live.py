"""The OpenAI-compatible front door (/v1), driven by the official `openai`
package against a real gunicorn and the stand-in LLM, for both upstream
protocols. What the stand-in produces is known from its rules: "@@words=N"
answers MARKER + "단어1 단어2 ... 단어N ", cut to max tokens."""
import json
import uuid

import openai
import pytest
import requests

from chatbot.standin import MARKER
from conftest import Gunicorn, SSEStream, bearer, gunicorn_env, new_api_key, wait_for
from helpers import in_thread, rows

PROTOCOLS = {"midm": {}, "openai": {"CHATBOT_LLM_PROTOCOL": "openai", "CHATBOT_LLM_MODEL": "midm-2.0-mini"}}
MODEL = {"midm": "chatbot", "openai": "midm-2.0-mini"}   # what /v1/models lists


def words(n):
    return MARKER + "".join(f"단어{i} " for i in range(1, n + 1))


def user(text):
    return {"role": "user", "content": text}


@pytest.fixture(scope="module", params=list(PROTOCOLS))
def front(request, tmp_path_factory, standin):
    env = {"CHATBOT_AUTH": "required", "CHATBOT_MAX_STREAMS_PER_KEY": "1", **PROTOCOLS[request.param]}
    server = Gunicorn(tmp_path_factory.mktemp("front") / "front.sqlite", gunicorn_env(standin, env))
    server.protocol = request.param
    yield server
    server.stop()


@pytest.fixture
def key(front):
    """A new API key for each test: its sessions, and its limits, are its own."""
    return new_api_key(front.db_path, f"t-{uuid.uuid4().hex[:8]}")


def sdk(server, key, **options):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, **{"max_retries": 0, **options})


def stored(server, session_id):
    return [(m["role"], m["content"], m["status"]) for m in rows(
        server.db_path, "SELECT role, content, status FROM messages WHERE session_id = ? ORDER BY seq", session_id)]


# --- 1. the SDK's calls -------------------------------------------------------------

def test_models_list_names_the_configured_model(front, key):
    assert [m.id for m in sdk(front, key).models.list()] == [MODEL[front.protocol]]


def test_a_plain_completion(front, key):
    raw = sdk(front, key).chat.completions.with_raw_response.create(
        model="whatever-the-client-likes", messages=[user("@@words=5")])
    answer = raw.parse()
    assert answer.object == "chat.completion" and answer.model == MODEL[front.protocol]
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == words(5)
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens == 5 and answer.usage.total_tokens > 5
    session_id = raw.headers["X-Session-Id"]
    assert stored(front, session_id) == [("user", "@@words=5", "complete"), ("assistant", words(5), "complete")]
    assert answer.id == "chatcmpl-" + rows(front.db_path, "SELECT message_id FROM messages WHERE session_id = ?"
                                           " AND role = 'assistant'", session_id)[0]["message_id"]


@pytest.mark.parametrize("include_usage", [False, True])
def test_a_streamed_completion(front, key, include_usage):
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = list(sdk(front, key).chat.completions.create(
        model="x", messages=[user("안녕 @@words=6")], stream=True, **options))
    with_choices = [c for c in chunks if c.choices]
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL[front.protocol] for c in chunks)
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == words(6)
    assert [c.choices[0].finish_reason for c in with_choices if c.choices[0].finish_reason] == ["stop"]
    usage = [c.usage for c in chunks if c.usage]
    if include_usage:
        assert chunks[-1].choices == [] and usage == [chunks[-1].usage]
        assert usage[0].completion_tokens == 6
    else:
        assert usage == []


def test_the_stream_helper(front, key):
    with sdk(front, key).chat.completions.stream(model="x", messages=[user("@@words=4")]) as stream:
        pieces = [event.delta for event in stream if event.type == "content.delta"]
        final = stream.get_final_completion()
    assert "".join(pieces) == words(4) == final.choices[0].message.content
    assert final.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_a_reply_cut_by_max_tokens_ends_with_length(front, key, stream):
    client = sdk(front, key)
    if stream:
        chunks = [c for c in client.chat.completions.create(
            model="x", messages=[user("@@words=10")], max_tokens=3, stream=True) if c.choices]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        choice = client.chat.completions.create(model="x", messages=[user("@@words=10")],
                                                max_completion_tokens=3).choices[0]
        text, finish = choice.message.content, choice.finish_reason
    assert text == words(3) and finish == "length"


# --- 2. the chunks on the wire ---------------------------------------------------------

def sse_blocks(response):
    return [block for block in response.content.decode("utf-8").split("\n\n") if block]


def test_chunks_on_the_wire_carry_positions_and_end_with_done(front, key):
    response = requests.post(front.url + "/v1/chat/completions", headers=bearer(key),
                             json={"model": "x", "messages": [user("@@words=5")], "stream": True})
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["X-Session-Id"] and response.headers["X-Accel-Buffering"] == "no"
    blocks = sse_blocks(response)
    assert blocks[-1] == "data: [DONE]"
    position, text = 0, ""
    for block in blocks[:-1]:
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        chunk = json.loads(lines["data"])
        assert set(chunk) == {"id", "object", "created", "model", "choices"}
        assert chunk["object"] == "chat.completion.chunk" and isinstance(chunk["created"], int)
        [choice] = chunk["choices"]
        assert set(choice) >= {"index", "delta", "finish_reason"} and choice["index"] == 0
        content = choice["delta"].get("content")
        if content:
            position += len(content)   # code points, as the contract's positions
            text += content
            assert lines["id"] == str(position)
        elif choice["finish_reason"]:
            assert lines["id"] == str(position)   # the terminal chunk: the final length
        else:
            assert "id" not in lines and choice["delta"] == {"role": "assistant", "content": ""}
    assert text == words(5)


# --- 3. where the conversation is stored ---------------------------------------------------

def test_a_conversation_continued_by_an_openai_client_stays_one_session(front, key, standin_log):
    client = sdk(front, key)
    first = [{"role": "system", "content": "Be brief."}, user("첫 질문 @@words=2")]
    raw = client.chat.completions.with_raw_response.create(model="x", messages=first)
    session_id, reply = raw.headers["X-Session-Id"], raw.parse().choices[0].message.content
    # The request's messages, system message included, are what went upstream.
    assert standin_log()[-1]["body"]["messages"] == first
    # The client sends the whole conversation again, with another system message: same session.
    second = [{"role": "system", "content": "Be very brief."}, user("첫 질문 @@words=2"),
              {"role": "assistant", "content": reply}, user("둘째 @@words=3")]
    raw = client.chat.completions.with_raw_response.create(model="x", messages=second)
    assert raw.headers["X-Session-Id"] == session_id
    assert standin_log()[-1]["body"]["messages"] == second
    # System messages are neither stored nor compared.
    assert stored(front, session_id) == [("user", "첫 질문 @@words=2", "complete"), ("assistant", words(2), "complete"),
                                         ("user", "둘째 @@words=3", "complete"), ("assistant", words(3), "complete")]
    title = rows(front.db_path, "SELECT title FROM sessions WHERE session_id = ?", session_id)[0]["title"]
    assert title == "첫 질문 @@words=2"


def test_an_unknown_conversation_starts_a_session_that_holds_its_earlier_messages(front, key):
    client = sdk(front, key)
    history = [user("옛 질문"), {"role": "assistant", "content": "옛 답"}]
    raw = client.chat.completions.with_raw_response.create(model="x", messages=history + [user("@@words=2")])
    session_id = raw.headers["X-Session-Id"]
    assert stored(front, session_id) == [("user", "옛 질문", "complete"), ("assistant", "옛 답", "complete"),
                                         ("user", "@@words=2", "complete"), ("assistant", words(2), "complete")]
    # The next turn finds it.
    again = history + [user("@@words=2"), {"role": "assistant", "content": words(2)}, user("@@words=1")]
    assert client.chat.completions.with_raw_response.create(
        model="x", messages=again).headers["X-Session-Id"] == session_id
    # Our own API sees one conversation.
    listed = requests.get(f"{front.url}/api/sessions/{session_id}/messages", headers=bearer(key)).json()
    assert len(listed["messages"]) == 6


def test_x_session_id_pins_the_session_and_the_request_is_still_the_context(front, key, standin_log):
    headers = bearer(key)
    session_id = requests.post(front.url + "/api/sessions", headers=headers).json()["session_id"]
    requests.post(front.url + "/api/chat", headers=headers, json={"session_id": session_id, "message": "앞"})
    raw = sdk(front, key).chat.completions.with_raw_response.create(
        model="x", messages=[user("@@words=1")], extra_headers={"X-Session-Id": session_id})
    assert raw.headers["X-Session-Id"] == session_id
    assert standin_log()[-1]["body"]["messages"] == [user("@@words=1")]
    assert [m[1] for m in stored(front, session_id)][-2:] == ["@@words=1", words(1)]


def test_sessions_are_the_callers_own(front, key):
    alice = sdk(front, key)
    bob = sdk(front, new_api_key(front.db_path, f"bob-{uuid.uuid4().hex[:8]}"))
    history = [user("공유된 질문"), {"role": "assistant", "content": "답"}]
    mine = alice.chat.completions.with_raw_response.create(model="x", messages=history + [user("@@words=1")])
    history += [user("@@words=1"), {"role": "assistant", "content": words(1)}]
    theirs = bob.chat.completions.with_raw_response.create(model="x", messages=history + [user("@@words=1")])
    assert theirs.headers["X-Session-Id"] != mine.headers["X-Session-Id"]   # bob's own copy
    with pytest.raises(openai.NotFoundError) as raised:
        bob.chat.completions.create(model="x", messages=[user("hi")],
                                    extra_headers={"X-Session-Id": mine.headers["X-Session-Id"]})
    assert raised.value.code == "session_not_found"
    with pytest.raises(openai.NotFoundError):
        alice.chat.completions.create(model="x", messages=[user("hi")], extra_headers={"X-Session-Id": "nope"})


# --- 4. errors the SDK understands -------------------------------------------------------

def test_a_bad_key_is_an_authentication_error(front):
    with pytest.raises(openai.AuthenticationError) as raised:
        sdk(front, "cbk_wrong_key").models.list()
    assert raised.value.code == "unauthorized" and raised.value.type == "authentication_error"


@pytest.mark.parametrize("change, param, code", [
    ({"messages": []}, "messages", "validation_error"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages[0]", "invalid_request"),
    ({"temperature": "hot"}, "temperature", "validation_error"),
    ({"max_tokens": 10**9}, "max_tokens", "invalid_request"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools",
     "unsupported_feature"),
    ({"n": 2}, "n", "unsupported_feature"),
    ({"logprobs": True}, "logprobs", "unsupported_feature"),
    ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
     "messages[0].content", "unsupported_feature"),
    ({"messages": [user("hi"), {"role": "tool", "tool_call_id": "1", "content": "42"}]}, "messages[1]",
     "unsupported_feature"),
])
def test_a_bad_or_unsupported_body_is_a_bad_request_error(front, key, change, param, code):
    body = {"model": "x", "messages": [user("hi")], **change}
    with pytest.raises(openai.BadRequestError) as raised:
        sdk(front, key).chat.completions.create(**body)
    assert raised.value.code == code and raised.value.param == param, raised.value.body
    assert raised.value.body["message"]
    # Refused before anything was stored: no session, not even a copy of the conversation.
    assert rows(front.db_path, "SELECT count(*) AS n FROM sessions JOIN api_keys ON owner = name"
                " WHERE key_id = ?", key.split("_")[1])[0]["n"] == 0


def conflicts(server, session_id):
    lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    return [f for f in lines if f["session_id"] == session_id and f["status"] == 409]


def test_a_reply_running_in_the_session_is_a_409_the_sdk_does_not_retry_then_stop_ends_it(front, key):
    stream = SSEStream(front.url, "/v1/chat/completions",
                       {"model": "x", "messages": [user("@@words=400 @@delay=0.02")], "stream": True},
                       headers=bearer(key))
    session_id = stream.headers["X-Session-Id"]
    blocks = stream.events()
    next(blocks)
    client = sdk(front, key, max_retries=2)   # the SDK's default: two retries of a 409
    with pytest.raises(openai.ConflictError) as raised:
        client.chat.completions.create(model="x", messages=[user("hi")],
                                       extra_headers={"X-Session-Id": session_id})
    assert raised.value.code == "generation_in_progress"
    assert raised.value.response.headers["x-should-retry"] == "false"
    # The request log (written as each response closes): it was sent once.
    assert len(wait_for(lambda: conflicts(front, session_id))) == 1
    # A stop through our own API ends the OpenAI stream, with the text so far kept.
    assert requests.post(f"{front.url}/api/sessions/{session_id}/stop", headers=bearer(key)).status_code == 202
    chunks = [json.loads(b.split("data: ", 1)[1]) for _, b, _ in blocks if "data: {" in b]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stopped"
    assert stream.raw.endswith(b"data: [DONE]\n\n")
    [reply] = rows(front.db_path, "SELECT content, status, finish_reason FROM messages WHERE session_id = ?"
                   " AND role = 'assistant'", session_id)
    assert reply["status"] == "incomplete" and reply["finish_reason"] == "stopped"
    assert words(400).startswith(reply["content"]) and reply["content"] != words(400)


def test_the_per_key_limit_of_running_replies_is_a_rate_limit_error(front, key):
    stream = SSEStream(front.url, "/v1/chat/completions",
                       {"model": "x", "messages": [user("@@words=400 @@delay=0.02")], "stream": True},
                       headers=bearer(key))
    next(stream.events())
    with pytest.raises(openai.RateLimitError) as raised:
        sdk(front, key).chat.completions.create(model="x", messages=[user("another chat")])
    assert raised.value.code == "too_many_streams" and raised.value.response.headers["Retry-After"]
    requests.post(f"{front.url}/api/sessions/{stream.headers['X-Session-Id']}/stop", headers=bearer(key))
    stream.close()


def test_an_llm_that_is_down_a_rate_limit_and_the_user_message_stored_first(start_server):
    dead = "http://127.0.0.1:9"   # nothing listens on the discard port on loopback
    server = start_server(CHATBOT_AUTH="required", CHATBOT_LLM_URL=dead, CHATBOT_RATE_LIMIT_PER_MINUTE="2")
    key = new_api_key(server.db_path, "dave")
    client = sdk(server, key)
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model="x", messages=[user("살아 있나요?")])
    assert raised.value.status_code == 503 and raised.value.code == "upstream_unavailable"
    session_id = raised.value.response.headers["X-Session-Id"]
    assert stored(server, session_id) == [("user", "살아 있나요?", "complete"), ("assistant", "", "failed")]
    client.models.list()
    with pytest.raises(openai.RateLimitError) as raised:
        client.models.list()
    assert int(raised.value.response.headers["Retry-After"]) >= 1 and raised.value.code == "rate_limited"


# --- 5. the same guarantees as our own endpoints ----------------------------------------------

def test_a_client_that_leaves_mid_stream_leaves_an_incomplete_reply(front, key, standin_log):
    stream = SSEStream(front.url, "/v1/chat/completions",
                       {"model": "x", "messages": [user("@@words=2000 @@delay=0.02")], "stream": True},
                       headers=bearer(key))
    session_id = stream.headers["X-Session-Id"]
    blocks = stream.events()
    next(blocks), next(blocks)
    stream.close()

    def reply():
        found = rows(front.db_path, "SELECT content, status, finish_reason FROM messages WHERE session_id = ?"
                     " AND role = 'assistant' AND status != 'pending'", session_id)
        return found[0] if found else None
    assert wait_for(reply, timeout=20)["finish_reason"] == "client_gone"
    assert reply()["status"] == "incomplete" and reply()["content"]
    assert wait_for(lambda: standin_log()[-1]["state"] == "cancelled")


@pytest.mark.parametrize("directive", ["@@words=6 @@break=3", "@@words=6 @@error=3"])
def test_an_upstream_that_breaks_off_is_an_error_in_the_stream(front, key, directive):
    raw = sdk(front, key).chat.completions.with_raw_response.create(
        model="x", messages=[user(directive)], stream=True)
    session_id = raw.headers["X-Session-Id"]
    received = []
    with pytest.raises(openai.APIError) as raised:
        for chunk in raw.parse():
            received.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
    assert raised.value.body["code"] in ("upstream_error", "upstream_timeout")
    [reply] = rows(front.db_path, "SELECT content, status FROM messages WHERE session_id = ?"
                   " AND role = 'assistant'", session_id)
    assert reply["status"] == "incomplete" and reply["content"] == "".join(received) == words(3)


def test_a_plain_completion_answers_while_another_streams(front, key):
    # The front door holds no lock of its own: a second key's turn runs beside a stream.
    other = new_api_key(front.db_path, f"o-{uuid.uuid4().hex[:8]}")
    waiting = in_thread(lambda: list(sdk(front, other).chat.completions.create(
        model="x", messages=[user("@@words=20 @@delay=0.02")], stream=True)))
    assert sdk(front, key).chat.completions.create(model="x", messages=[user("@@words=2")]).choices[0] \
        .message.content == words(2)
    assert "".join(c.choices[0].delta.content or "" for c in waiting() if c.choices) == words(20)


def test_an_idempotency_key_replays_the_turn_instead_of_a_second_generation(front, key, standin_log):
    client = sdk(front, key)
    calls_before = len(standin_log())
    first = client.chat.completions.with_raw_response.create(
        model="x", messages=[user("@@words=3")], extra_headers={"Idempotency-Key": "turn-1"})
    again = client.chat.completions.with_raw_response.create(
        model="x", messages=[user("@@words=3")], extra_headers={"Idempotency-Key": "turn-1"})
    assert again.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
    assert again.headers["X-Session-Id"] == first.headers["X-Session-Id"]
    assert again.parse().choices[0].message.content == first.parse().choices[0].message.content == words(3)
    assert len(standin_log()) == calls_before + 1   # one generation
    assert len(stored(front, first.headers["X-Session-Id"])) == 2
    # Streamed, the replay is the whole turn again.
    replayed = list(client.chat.completions.create(model="x", messages=[user("@@words=3")], stream=True,
                                                   extra_headers={"Idempotency-Key": "turn-1"}))
    assert "".join(c.choices[0].delta.content or "" for c in replayed if c.choices) == words(3)
    # The same key for another request is refused, as on our own API.
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="x", messages=[user("@@words=4")],
                                       extra_headers={"Idempotency-Key": "turn-1"})
    assert raised.value.code == "idempotency_key_reused"


def test_a_retry_with_its_key_attaches_to_the_running_turn(front, key, standin_log):
    body = {"model": "x", "messages": [user("@@words=30 @@delay=0.05")], "stream": True}
    headers = {**bearer(key), "Idempotency-Key": "running-1"}
    first = SSEStream(front.url, "/v1/chat/completions", body, headers=headers)
    next(first.events())
    calls = len(standin_log())
    second = SSEStream(front.url, "/v1/chat/completions", body, headers=headers)   # no 409
    assert second.status == 200 and second.headers["X-Session-Id"] == first.headers["X-Session-Id"]
    text = "".join(json.loads(b.split("data: ", 1)[1])["choices"][0]["delta"].get("content") or ""
                   for _, b, _ in second.events() if "data: {" in b and '"choices": [{' in b)
    assert text == words(30) and len(standin_log()) == calls
    first.close()


def test_our_own_clients_reattach_with_the_positions_of_a_v1_stream(front, key):
    stream = SSEStream(front.url, "/v1/chat/completions",
                       {"model": "x", "messages": [user("@@words=40 @@delay=0.02")], "stream": True},
                       headers=bearer(key))
    blocks = stream.events()
    received, position, message_id = "", None, None
    for _, block, _ in blocks:
        if "data: {" not in block:   # a keep-alive comment
            continue
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        chunk = json.loads(lines["data"])
        message_id = chunk["id"].removeprefix("chatcmpl-")
        received += chunk["choices"][0]["delta"].get("content") or ""
        if "id" in lines:
            position = int(lines["id"])
            if position > 10:
                break
    stream.close()   # the connection drops mid-answer
    session_id = stream.headers["X-Session-Id"]
    rest = SSEStream(front.url, f"/api/sessions/{session_id}/messages/{message_id}/stream?after={position}",
                     headers=bearer(key))
    events = list(rest.events())
    assert events[-1][0] == "done"
    assert received + "".join(e[1]["content"] for e in events if e[0] == "delta") == words(40)
