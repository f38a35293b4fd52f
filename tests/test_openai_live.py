"""CHATBOT_LLM_PROTOCOL=openai against the stand-in's /v1/chat/completions."""
import requests

from conftest import SSEStream

OPENAI = {"CHATBOT_LLM_PROTOCOL": "openai", "CHATBOT_LLM_MODEL": "midm-2.0-mini",
          "CHATBOT_LLM_API_KEY": "sk-upstream-secret"}


def test_a_streamed_turn_uses_chat_completions_with_model_key_and_usage(start_server, standin_log):
    server = start_server(**OPENAI)
    sid = server.new_session()
    events = list(SSEStream(server.url, "/api/chat/stream",
                            {"session_id": sid, "message": "안녕 @@words=5"}).events())
    done = events[-1][1]
    assert events[-1][0] == "done" and done["status"] == "complete" and done["finish_reason"] == "stop"
    assert "".join(e[1]["content"] for e in events if e[0] == "delta") == done["content"]
    # Usage came from the upstream's include_usage chunk, not from our estimate.
    assert done["token_usage"]["completion_tokens"] == 5 and "estimated" not in done["token_usage"]
    request = standin_log()[-1]
    assert request["path"] == "/v1/chat/completions"
    assert request["authorization"] == "Bearer sk-upstream-secret"
    assert request["body"]["model"] == "midm-2.0-mini"
    assert request["body"]["stream"] is True
    assert request["body"]["stream_options"] == {"include_usage": True}
    assert request["body"]["messages"][-1] == {"role": "user", "content": "안녕 @@words=5"}


def test_a_plain_turn_uses_chat_completions_without_streaming(start_server, standin_log):
    server = start_server(**OPENAI)
    sid = server.new_session()
    answer = requests.post(server.url + "/api/chat", json={"session_id": sid, "message": "@@words=3"})
    assert answer.status_code == 200
    assert answer.json()["content"].startswith("[stand-in LLM")
    assert standin_log()[-1]["body"]["stream"] is False


def test_health_asks_v1_models(start_server):
    llm = start_server(**OPENAI).get("/api/health")["llm"]
    assert llm["ok"] is True and llm["protocol"] == "openai" and llm["latency_ms"] is not None


def test_upstream_error_statuses_become_problem_codes(start_server):
    server = start_server(**OPENAI)
    sid = server.new_session()
    for directive, status, code in [("@@status=500", 502, "upstream_error"),
                                    ("@@status=500@text", 502, "upstream_error"),
                                    ("@@status=400", 502, "upstream_error"),
                                    ("@@status=503", 503, "upstream_unavailable")]:
        for path in ("/api/chat", "/api/chat/stream"):
            answer = requests.post(server.url + path, json={"session_id": sid, "message": directive})
            assert answer.status_code == status, (directive, path)
            assert answer.headers["Content-Type"] == "application/problem+json"
            assert answer.json()["code"] == code
            assert "stand-in" not in answer.json()["detail"]  # the upstream's own words go to the log
    server.stop()
    assert "stand-in error" in server.output() and "sk-upstream-secret" not in server.output()


def test_an_error_chunk_mid_stream_ends_with_an_error_event(start_server):
    server = start_server(**OPENAI)
    sid = server.new_session()
    events = list(SSEStream(server.url, "/api/chat/stream", {"session_id": sid, "message": "@@error=2"}).events())
    assert events[-1][0] == "error" and events[-1][1]["code"] == "upstream_error"
    reply = server.get(f"/api/sessions/{sid}/messages")["messages"][-1]
    assert reply["status"] == "incomplete" and reply["error"]["code"] == "upstream_error"


def test_a_stream_without_finish_reason_is_incomplete(start_server):
    server = start_server(**OPENAI)
    sid = server.new_session()
    events = list(SSEStream(server.url, "/api/chat/stream",
                            {"session_id": sid, "message": "@@words=3 @@nofinish"}).events())
    assert events[-1][0] == "error"
    reply = server.get(f"/api/sessions/{sid}/messages")["messages"][-1]
    assert reply["status"] == "incomplete" and reply["content"]
