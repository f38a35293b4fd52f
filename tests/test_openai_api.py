"""The OpenAI front door's rules that are not about streaming (Flask test
client): the context budget, finding a conversation's session, errors in
OpenAI's shape. Streams and the SDK: tests/test_openai_api_live.py."""
import pytest

from chatbot import context, db, store
from chatbot.context import count_tokens
from helpers import rows


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def complete(client, messages, **extra):
    return client.post("/v1/chat/completions", json={"model": "x", "messages": messages, **extra},
                       headers=extra.pop("headers", {}))


def openai_error(response, status, code):
    assert response.status_code == status, response.json
    assert response.mimetype == "application/json"
    error = response.json["error"]
    assert error["code"] == code and error["message"] and error["type"], error
    return error


def sessions(app):
    return rows(app.config["DATABASE"], "SELECT session_id FROM sessions")


def reply_of(response):
    return response.json["choices"][0]["message"]["content"]


def test_trim_keeps_every_system_message_in_place_and_the_latest_turns():
    messages = [{"role": "system", "content": "S1"}, user("old question " * 30), assistant("old answer"),
                {"role": "system", "content": "S2"}, user("u2"), assistant("a2"), user("u3")]
    budget = count_tokens(messages) - context.estimate_tokens("old question " * 30)
    trimmed = context.trim(messages, budget)
    # The old question does not fit; its answer goes with it (a context never starts with a reply).
    assert trimmed == [messages[0], messages[3], user("u2"), assistant("a2"), user("u3")]
    assert context.trim(messages, budget + 1000) == messages
    assert context.fits_messages(messages, count_tokens([messages[0], messages[3], messages[6]]))
    assert not context.fits_messages(messages, count_tokens([messages[0], messages[3], messages[6]]) - 1)


def test_the_request_is_trimmed_to_the_context_budget(make_app, standin_log):
    client = make_app(CONTEXT_MAX_TOKENS=120).test_client()
    history = [user(f"question {i} " * 8) if i % 2 == 0 else assistant(f"answer {i}") for i in range(10)]
    messages = [{"role": "system", "content": "Be brief."}] + history + [user("@@words=2")]
    assert complete(client, messages).status_code == 200
    sent = standin_log()[-1]["body"]["messages"]
    assert count_tokens(sent) <= 120 and sent[0] == messages[0] and sent[-1] == messages[-1]
    assert len(sent) < len(messages) and sent[1]["role"] == "user"


def test_a_last_message_beyond_the_budget_is_a_400_and_stores_nothing(make_app):
    app = make_app(CONTEXT_MAX_TOKENS=60)
    client = app.test_client()
    error = openai_error(complete(client, [user("old"), assistant("answer"), user("word " * 200)]),
                         400, "context_length_exceeded")
    assert "60 tokens" in error["message"]
    assert sessions(app) == []


def test_a_retried_failed_turn_and_a_turn_through_our_own_api_keep_one_session(make_app, standin, tmp_path):
    ok = make_app().test_client()
    down = make_app(LLM_URL="http://127.0.0.1:9", LLM_CONNECT_RETRIES=0).test_client()
    first = complete(ok, [user("u1 @@words=1")])
    sid, r1 = first.headers["X-Session-Id"], reply_of(first)
    # The upstream is down: the user message is stored, the reply failed...
    failed = complete(down, [user("u1 @@words=1"), assistant(r1), user("u2 @@words=1")])
    assert failed.status_code == 503 and failed.headers["X-Session-Id"] == sid
    # ...and the client's retry of the same messages still finds the session.
    retried = complete(ok, [user("u1 @@words=1"), assistant(r1), user("u2 @@words=1")])
    assert retried.headers["X-Session-Id"] == sid
    r2 = reply_of(retried)
    # A turn through /api/chat moves the session's conversation on too.
    r3 = ok.post("/api/chat", json={"session_id": sid, "message": "u3 @@words=1"}).json["content"]
    conversation = [user("u1 @@words=1"), assistant(r1), user("u2 @@words=1"), assistant(r2),
                    user("u3 @@words=1"), assistant(r3)]
    assert complete(ok, conversation + [user("u4 @@words=1")]).headers["X-Session-Id"] == sid
    # The old point of the conversation is no longer this session: a branch gets its own.
    branch = complete(ok, conversation[:2] + [user("other @@words=1")])
    assert branch.headers["X-Session-Id"] != sid


def test_the_conversation_is_found_through_an_index(app):
    conn = db.connect(app.config["DATABASE"])
    try:
        query = ("SELECT session_id FROM sessions WHERE owner = ? AND conversation_hash = ?"
                 " ORDER BY activity_seq DESC LIMIT 5")
        if conn.engine == "sqlite":
            plan = " ".join(row["detail"] for row in conn.execute("EXPLAIN QUERY PLAN " + query, ("local", "x")))
            assert "USING INDEX sessions_by_conversation (owner=? AND conversation_hash=?)" in plan, plan
        else:   # a table this small would be scanned whatever its indexes: ask for the index's plan
            conn.execute("SET enable_seqscan = off")
            plan = " ".join(row[0] for row in conn.execute("EXPLAIN " + query, ("local", "x")))
            assert "using sessions_by_conversation" in plan and "Index Cond" in plan, plan
        # The digest ignores system messages, surrounding whitespace and answerless user messages.
        digest = store.conversations.conversation_hash
        assert digest([{"role": "system", "content": "S"}, user("q "), assistant("a")]) \
            == digest([user("q"), user(" q"), assistant(" a\n")])
        assert digest([user("q")]) is None and digest([]) is None
    finally:
        conn.close()


@pytest.mark.parametrize("request_, status, code", [
    (lambda c: c.get("/v1/nowhere"), 404, "not_found"),
    (lambda c: c.get("/v1/chat/completions"), 405, "method_not_allowed"),
    (lambda c: c.post("/v1/chat/completions", data="{", content_type="application/json"), 400, "invalid_json"),
    (lambda c: c.post("/v1/chat/completions", data="hi", content_type="text/plain"), 415,
     "unsupported_media_type"),
    (lambda c: c.post("/v1/chat/completions", json={"messages": [user("hi")], "stream": "yes"}), 400,
     "validation_error"),
])
def test_errors_on_v1_paths_are_in_openais_shape(client, request_, status, code):
    openai_error(request_(client), status, code)


def test_without_a_key_v1_is_a_401_in_openais_shape(make_app):
    client = make_app(AUTH="required").test_client()
    for response in (client.get("/v1/models"), complete(client, [user("hi")])):
        error = openai_error(response, 401, "unauthorized")
        assert error["type"] == "authentication_error"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    # Our own paths keep problem+json.
    assert client.get("/api/sessions").mimetype == "application/problem+json"


def test_an_upstream_timeout_is_a_504_or_an_error_chunk_and_the_reply_is_stored(make_app):
    app = make_app(LLM_FIRST_TOKEN_TIMEOUT=0.5)
    client = app.test_client()
    openai_error(complete(client, [user("@@words=2 @@first=3")]), 504, "upstream_timeout")
    # Streamed: the stand-in sends its headers at once, so the stream has started.
    streamed = complete(client, [user("@@words=2 @@first=3")], stream=True)
    assert streamed.status_code == 200
    last = streamed.data.decode().strip().split("\n\n")[-1]
    assert '"code": "upstream_timeout"' in last and "[DONE]" not in streamed.data.decode()
    replies = rows(app.config["DATABASE"], "SELECT status, error FROM messages WHERE role = 'assistant'")
    assert [r["status"] for r in replies] == ["failed", "failed"]
    assert all("upstream_timeout" in r["error"] for r in replies)


def test_an_upgraded_databases_conversations_are_found(tmp_path, standin):
    from chatbot import create_app
    from test_upgrade_conversations import FIRST, first_schema_database

    path = tmp_path / "old.sqlite"
    first_schema_database(path)   # s-old: FIRST, its answer, then "고마워요" whose reply failed
    client = create_app({"TESTING": True, "DATABASE": str(path), "LLM_URL": standin, "AUTH": "disabled"}) \
        .test_client()
    answer = complete(client, [user(FIRST), assistant("KTX가 가장 빠릅니다."), user("고마워요 @@words=1")])
    assert answer.status_code == 200 and answer.headers["X-Session-Id"] == "s-old"


def test_v1_requests_and_turns_are_in_the_metrics(client):
    from test_metrics import scrape, value

    before = scrape(client)
    reply = complete(client, [user("@@words=3")], stream=True)
    assert reply.status_code == 200 and reply.get_data().endswith(b"data: [DONE]\n\n")
    reply.close()
    refused = complete(client, [user("hi")], n=2)
    openai_error(refused, 400, "unsupported_feature")
    refused.close()   # the request is counted when its response closes
    after = scrape(client)

    def grew(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)
    assert grew("chatbot_replies_total", status="complete", finish_reason="stop") == 1
    assert grew("chatbot_tokens_total", type="output") == 3
    assert grew("chatbot_http_requests_total", method="POST", route="/v1/chat/completions", status="200") == 1
    assert grew("chatbot_http_requests_total", method="POST", route="/v1/chat/completions", status="400") == 1
