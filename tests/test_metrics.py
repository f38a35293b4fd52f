"""GET /metrics: Prometheus text for every worker of the host, behind the
metrics token (or loopback), with no session id, key or text in any label."""
import json
import os
import re
import signal

import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, SSEStream, bearer, new_api_key, wait_for
from helpers import assert_problem

SAID = "비밀 이야기 7d41e2"   # a message whose text must not reach any label

NAMES = ["chatbot_time_to_first_token_seconds", "chatbot_reply_duration_seconds", "chatbot_tokens_total",
         "chatbot_replies_total", "chatbot_replies_in_progress", "chatbot_http_requests_total",
         "chatbot_http_request_duration_seconds", "chatbot_upstream_errors_total", "chatbot_resumes_total",
         "chatbot_idempotent_replays_total"]


def samples(text):
    """{(sample name, sorted labels): value} of a Prometheus text page."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(page, name, **labels):
    return page.get((name, tuple(sorted(labels.items()))), 0)


def scrape(client, **kwargs):
    response = client.get("/metrics", **kwargs)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return samples(response.get_data(as_text=True))


def test_a_turn_and_its_requests_are_counted(client, session_id):
    before = scrape(client)
    reply = client.post("/api/chat/stream", json={"session_id": session_id, "message": "@@words=3"})
    assert reply.status_code == 200 and b"event: done" in reply.get_data()
    reply.close()
    client.post("/api/chat", json={"session_id": session_id, "message": "@@status=503"}).close()
    after = scrape(client)

    def grew(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)
    assert grew("chatbot_replies_total", status="complete", finish_reason="stop") == 1
    assert grew("chatbot_replies_total", status="failed", finish_reason="none") == 1
    assert grew("chatbot_upstream_errors_total", code="upstream_unavailable") == 1
    assert grew("chatbot_tokens_total", type="output") == 3          # the stand-in's own count
    assert grew("chatbot_tokens_total", type="input") > 0
    assert grew("chatbot_time_to_first_token_seconds_count") == 1   # the failed reply had no text
    assert grew("chatbot_reply_duration_seconds_count") == 2
    assert value(after, "chatbot_replies_in_progress") == value(before, "chatbot_replies_in_progress")
    assert grew("chatbot_http_requests_total", method="POST", route="/api/chat/stream", status="200") == 1
    assert grew("chatbot_http_requests_total", method="POST", route="/api/chat", status="503") == 1
    assert grew("chatbot_http_request_duration_seconds_count", route="/api/chat/stream") == 1


def test_every_metric_of_the_contract_is_there(client):
    text = client.get("/metrics").get_data(as_text=True)
    for name in NAMES:
        assert f"# TYPE {name} " in text, name


def test_no_label_holds_a_session_id_a_key_or_text(make_app):
    app = make_app(AUTH="required")
    key = new_api_key(app.config["DATABASE"], "alice-7d41e2")
    client = app.test_client()
    sid = client.post("/api/sessions", headers=bearer(key)).json["session_id"]
    client.post("/api/chat", headers=bearer(key), json={"session_id": sid, "message": SAID}).close()
    client.get(f"/api/sessions/{sid}/messages", headers=bearer(key)).close()
    client.get(f"/api/no/such/{sid}", headers=bearer(key)).close()
    client.open("/api/sessions", method="BREW", headers=bearer(key)).close()
    text = client.get("/metrics").get_data(as_text=True)
    assert sid not in text and "7d41e2" not in text and key.split("_", 2)[2] not in text
    assert 'route="/api/sessions/<session_id>/messages"' in text and "BREW" not in text


def test_with_a_metrics_token_only_that_token_opens_it(make_app):
    app = make_app(AUTH="required", METRICS_TOKEN="m3trics-token")
    client = app.test_client()
    api_key = new_api_key(app.config["DATABASE"], "alice")
    for headers in ({}, bearer("wrong"), bearer(api_key)):
        problem = assert_problem(client.get("/metrics", headers=headers), 401, "unauthorized")
        assert "m3trics" not in str(problem)
    scrape(client, headers=bearer("m3trics-token"))


def test_without_a_token_it_is_open_to_loopback_only(make_app):
    app = make_app(AUTH="required")
    client = app.test_client()
    scrape(client)   # the test client comes from 127.0.0.1
    scrape(client, environ_base={"REMOTE_ADDR": "::1"})
    assert_problem(client.get("/metrics", environ_base={"REMOTE_ADDR": "192.0.2.7"}), 401, "unauthorized")
    # Through a proxy on this machine (nginx), the client is not local.
    assert_problem(client.get("/metrics", headers={"X-Forwarded-For": "192.0.2.7"}), 401, "unauthorized")
    api_key = new_api_key(app.config["DATABASE"], "alice")
    assert_problem(client.get("/metrics", headers=bearer(api_key)), 401, "unauthorized")


def live_scrape(server):
    response = requests.get(server.url + "/metrics")
    assert response.status_code == 200, response.text
    return samples(response.text)


def test_a_host_with_several_workers_shows_their_sum(start_server, tmp_path):
    server = start_server(CHATBOT_WORKERS="2", PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"))
    sid = server.new_session()
    stream = SSEStream(server.url, "/api/chat/stream", {"session_id": sid, "message": "@@words=200 @@delay=0.05"})
    events = stream.events()
    assert next(events)[0] == "start"
    # Each scrape may be answered by either worker; every one sees the running reply.
    for _ in range(6):
        assert value(live_scrape(server), "chatbot_replies_in_progress") == 1
    # Short replies on new connections, spread over both workers.
    for _ in range(6):
        other = server.new_session()
        assert requests.post(server.url + "/api/chat", json={"session_id": other, "message": "@@words=2"}).ok
    # A request is counted when its response is closed, which may be just after the client read it.
    assert wait_for(lambda: value(live_scrape(server), "chatbot_http_requests_total", method="POST",
                                  route="/api/chat", status="200") == 6)
    for _ in range(4):
        page = live_scrape(server)
        assert value(page, "chatbot_replies_total", status="complete", finish_reason="stop") == 6
        assert value(page, "chatbot_http_requests_total", method="POST", route="/api/chat", status="200") == 6

    # The workers die (the one running the long reply among them): that reply no
    # longer counts as in progress (child_exit drops their live gauges), and the
    # counts they made stay.
    for pid in server.worker_pids():
        os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: value(live_scrape(server), "chatbot_replies_in_progress") == 0, timeout=20)
    page = live_scrape(server)
    assert value(page, "chatbot_replies_total", status="complete", finish_reason="stop") == 6


def test_a_new_start_begins_from_zero(start_server, tmp_path):
    directory = tmp_path / "metrics"
    first = start_server(CHATBOT_WORKERS="1", PROMETHEUS_MULTIPROC_DIR=str(directory))
    sid = first.new_session()
    assert requests.post(first.url + "/api/chat", json={"session_id": sid, "message": "@@words=2"}).ok
    assert value(live_scrape(first), "chatbot_replies_total", status="complete", finish_reason="stop") == 1
    first.stop()
    second = start_server(CHATBOT_WORKERS="1", PROMETHEUS_MULTIPROC_DIR=str(directory))
    assert value(live_scrape(second), "chatbot_replies_total", status="complete", finish_reason="stop") == 0


def test_the_grafana_dashboard_shows_every_metric_and_no_other(client):
    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    used = {re.sub("_bucket$", "", name) for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"chatbot_[a-z_]+", target["expr"])}
    shown = set(re.findall(r"^# TYPE (\S+) ", client.get("/metrics").get_data(as_text=True), re.M))
    assert used == set(NAMES) and used <= shown


def test_resumes_and_idempotent_replays_are_counted(client, session_id):
    before = scrape(client)
    body = {"session_id": session_id, "message": "@@words=2"}
    first = client.post("/api/chat", json=body, headers={"Idempotency-Key": "k-1"})
    again = client.post("/api/chat", json=body, headers={"Idempotency-Key": "k-1"})
    assert again.headers["Idempotent-Replayed"] == "true" and again.json == first.json
    message_id = first.json["message_id"]
    resumed = client.get(f"/api/sessions/{session_id}/messages/{message_id}/stream?after=0")
    assert resumed.status_code == 200 and b"event: done" in resumed.get_data()
    resumed.close()
    after = scrape(client)
    assert value(after, "chatbot_idempotent_replays_total") - value(before, "chatbot_idempotent_replays_total") == 1
    assert value(after, "chatbot_resumes_total") - value(before, "chatbot_resumes_total") == 1
    # A replay or a re-attach starts no reply.
    assert (value(after, "chatbot_replies_total", status="complete", finish_reason="stop")
            - value(before, "chatbot_replies_total", status="complete", finish_reason="stop")) == 1
