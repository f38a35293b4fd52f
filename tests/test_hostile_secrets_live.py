"""No secret leaves the server (issue: hostile clients): the LLM server's
credentials never reach an answer, a log line or a stored field; health
shows where the LLM server is only to callers with a key; an upstream's own
error body goes to the log, not to the client."""
import json

import requests

from conftest import free_port
from helpers import assert_problem

PASSWORD = "s3cret-pw-7d1e"


def with_credentials(url):
    return url.replace("http://", f"http://admin:{PASSWORD}@")


def test_health_without_a_key_shows_the_state_but_not_the_url(start_server, standin):
    server = start_server(CHATBOT_AUTH="required", CHATBOT_LLM_URL=with_credentials(standin))
    alice = server.new_key("alice")
    public = requests.get(server.url + "/api/health")
    assert public.status_code == 200 and PASSWORD not in public.text and "admin" not in public.text
    body = public.json()
    assert body["status"] == "ok" and body["llm"]["ok"] is True and body["llm"]["latency_ms"] >= 0
    assert "url" not in body["llm"]
    for headers in ({"Authorization": "Bearer cbk_nope_nope"}, {}):
        assert "url" not in requests.get(server.url + "/api/health", headers=headers).json()["llm"]
    keyed = requests.get(server.url + "/api/health", headers=alice)
    assert keyed.json()["llm"]["url"] == standin     # shown, without the credentials
    assert PASSWORD not in keyed.text


def test_an_unreachable_llm_server_with_credentials_leaks_them_nowhere(start_server):
    url = with_credentials(f"http://127.0.0.1:{free_port()}")
    server = start_server(CHATBOT_LLM_URL=url, CHATBOT_LLM_CONNECT_RETRIES="0")
    sid = server.new_session()
    for path in ("/api/chat", "/api/chat/stream"):
        answer = requests.post(server.url + path, json={"session_id": sid, "message": "hi"})
        assert_problem(answer, 503, "upstream_unavailable")
        assert PASSWORD not in answer.text and "admin" not in answer.text
    health = requests.get(server.url + "/api/health")
    assert health.json()["status"] == "degraded" and PASSWORD not in health.text
    stored = requests.get(f"{server.url}/api/sessions/{sid}/messages").json()["messages"]
    assert [m["error"]["code"] for m in stored if m["role"] == "assistant"] == ["upstream_unavailable"] * 2
    for fmt in ("json", "markdown"):
        export = requests.get(f"{server.url}/api/sessions/{sid}/export?format={fmt}")
        assert export.status_code == 200 and PASSWORD not in export.text
    server.stop()
    assert PASSWORD not in server.output() and "127.0.0.1" in server.output()   # logged, without them


def test_an_upstream_error_body_goes_to_the_log_not_to_the_client(start_server, standin):
    server = start_server(CHATBOT_LLM_URL=with_credentials(standin))
    sid = server.new_session()
    for directive, status, code in [("@@status=500", 502, "upstream_error"),
                                    ("@@status=500@text", 502, "upstream_error"),
                                    ("@@status=503", 503, "upstream_unavailable")]:
        for path in ("/api/chat", "/api/chat/stream"):
            answer = requests.post(server.url + path, json={"session_id": sid, "message": directive})
            problem = assert_problem(answer, status, code)
            assert "stand-in" not in problem["detail"], problem   # the upstream's words stay inside
            assert problem["detail"].startswith("The LLM server")
    stored = requests.get(f"{server.url}/api/sessions/{sid}/messages").json()["messages"]
    assert not any("stand-in" in json.dumps(m["error"]) for m in stored if m["error"])
    server.stop()
    log = server.output()
    assert "stand-in error" in log and "stand-in plain error" in log
    assert PASSWORD not in log
