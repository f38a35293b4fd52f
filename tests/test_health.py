"""GET /api/health: the database and the LLM server, never hanging."""
import http.server
import threading
import time

import pytest


def test_all_well(client, standin):
    response = client.get("/api/health")
    assert response.status_code == 200
    body = response.json
    assert body["status"] == "ok"
    assert body["database"]["ok"] is True and body["database"]["latency_ms"] >= 0
    llm = body["llm"]
    assert llm["ok"] is True and llm["url"] == standin and llm["protocol"] == "midm"
    assert llm["latency_ms"] >= 0 and llm["standin"] is True


def test_the_openai_protocol_is_checked_on_its_models_endpoint(make_app):
    client = make_app(LLM_PROTOCOL="openai").test_client()
    assert client.get("/api/health").json["llm"]["ok"] is True


def test_an_unreachable_llm_is_degraded(make_app):
    client = make_app(LLM_URL="http://127.0.0.1:9").test_client()
    response = client.get("/api/health")
    assert response.status_code == 200
    assert response.json["status"] == "degraded"
    assert response.json["llm"]["ok"] is False and response.json["database"]["ok"] is True


@pytest.mark.parametrize("hang_connect", [False, True])
def test_a_hung_llm_server_does_not_hang_the_health_check(make_app, silent_listener, hang_connect):
    client = make_app(LLM_URL=silent_listener(hang_connect), HEALTH_TIMEOUT=0.5).test_client()
    started = time.monotonic()
    response = client.get("/api/health")
    assert time.monotonic() - started < 5
    assert response.status_code == 200 and response.json["status"] == "degraded"
    assert response.json["llm"]["ok"] is False


@pytest.mark.sqlite_only
def test_a_database_that_cannot_be_opened_is_503(app, client, tmp_path):
    app.config["DATABASE"] = str(tmp_path)  # a directory: SQLite cannot open it
    response = client.get("/api/health")
    assert response.status_code == 503
    assert response.json["database"]["ok"] is False and response.json["database"]["error"]
    assert response.json["status"] != "ok"


@pytest.mark.sqlite_only
def test_a_database_file_that_is_not_sqlite_is_503(app, client, tmp_path):
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database" * 100)
    app.config["DATABASE"] = str(garbage)
    response = client.get("/api/health")
    assert response.status_code == 503 and response.json["database"]["ok"] is False


@pytest.mark.sqlite_only
def test_a_database_without_its_tables_is_503(app, client, tmp_path):
    app.config["DATABASE"] = str(tmp_path / "empty.sqlite")
    assert client.get("/api/health").status_code == 503


@pytest.fixture
def llm_health_answering():
    """llm_health_answering(body) -> the URL of an LLM server whose health
    endpoint answers `body` (bytes) as application/json."""
    servers = []

    def make(body):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return "http://127.0.0.1:%d" % server.server_address[1]
    yield make
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("protocol", ["midm", "openai"])
@pytest.mark.parametrize("body", [b"[]", b'"ok"', b"3", b"null", b"true"])
def test_a_health_answer_that_is_json_but_not_an_object_says_nothing_more(make_app, llm_health_answering,
                                                                          protocol, body):
    client = make_app(LLM_URL=llm_health_answering(body), LLM_PROTOCOL=protocol).test_client()
    response = client.get("/api/health")
    assert response.status_code == 200 and response.json["status"] == "ok"
    assert response.json["llm"]["ok"] is True and response.json["llm"]["status_code"] == 200


def test_a_health_answer_that_is_not_json_is_degraded(make_app, llm_health_answering):
    client = make_app(LLM_URL=llm_health_answering(b"{not json")).test_client()
    response = client.get("/api/health")
    assert response.status_code == 200 and response.json["status"] == "degraded"
    assert response.json["llm"]["ok"] is False
