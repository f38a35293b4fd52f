"""API keys, who owns a session, and CORS."""
import hashlib
import json
import logging
import uuid

import pytest
import websocket

import helpers
from chatbot import access
from conftest import bearer, new_api_key


@pytest.fixture
def secured(make_app):
    """An app with API keys required (the default outside the tests)."""
    return make_app(AUTH="required")


@pytest.fixture
def secured_client(secured):
    return secured.test_client()


@pytest.fixture
def keys(secured):
    """keys(name) -> Authorization headers with a new key for `name`."""
    return lambda name: bearer(new_api_key(secured.config["DATABASE"], name))


def rows(app, sql):
    return [tuple(row.values()) for row in helpers.rows(app.config["DATABASE"], sql)]


# --- keys and the CLI --------------------------------------------------------

def test_create_api_key_prints_a_key_once_and_stores_only_a_salted_hash(secured):
    runner = secured.test_cli_runner()
    result = runner.invoke(args=["create-api-key", "alice"])
    assert result.exit_code == 0
    key = result.stdout.strip()
    assert key.startswith("cbk_") and len(key) > 40
    secret = key.split("_", 2)[2]  # cbk_<key id>_<secret>

    (row,) = rows(secured, "SELECT * FROM api_keys")
    stored = " ".join(str(v) for v in row)
    assert secret not in stored and key not in stored
    assert hashlib.sha256(secret.encode()).hexdigest() not in stored  # salted, not a bare hash

    again = runner.invoke(args=["create-api-key", "alice"])
    assert again.exit_code != 0 and "cbk_" not in again.output
    missing_ok = runner.invoke(args=["create-api-key", "alice", "--if-missing"])
    assert missing_ok.exit_code == 0 and "cbk_" not in missing_ok.stdout

    client = secured.test_client()
    assert client.post("/api/sessions", headers=bearer(key)).status_code == 201


def test_two_keys_with_the_same_secret_get_different_hashes(secured):
    # The per-key salt: equal inputs must not be recognisable in the table.
    salt_a, salt_b = "00" * 16, "11" * 16
    assert access._digest(salt_a, "same") != access._digest(salt_b, "same")


def test_revoked_key_is_refused_at_once_and_a_replacement_keeps_the_sessions(secured, secured_client):
    runner = secured.test_cli_runner()
    old = runner.invoke(args=["create-api-key", "bob"]).stdout.strip()
    sid = secured_client.post("/api/sessions", headers=bearer(old)).json["session_id"]

    assert runner.invoke(args=["revoke-api-key", "bob"]).exit_code == 0
    answer = secured_client.get(f"/api/sessions/{sid}", headers=bearer(old))
    assert answer.status_code == 401 and answer.json["code"] == "unauthorized"
    assert runner.invoke(args=["revoke-api-key", "bob"]).exit_code != 0

    new = runner.invoke(args=["create-api-key", "bob", "--replace"]).stdout.strip()
    assert new != old
    assert secured_client.get(f"/api/sessions/{sid}", headers=bearer(new)).status_code == 200


def test_list_api_keys_names_keys_without_showing_them(secured):
    runner = secured.test_cli_runner()
    key = runner.invoke(args=["create-api-key", "carol"]).stdout.strip()
    runner.invoke(args=["create-api-key", "dave"])
    runner.invoke(args=["revoke-api-key", "dave"])
    listing = runner.invoke(args=["list-api-keys"]).output
    assert "carol" in listing and "active" in listing
    assert "dave" in listing and "revoked" in listing
    assert key.split("_", 2)[2] not in listing


def test_key_names_are_checked(secured):
    result = secured.test_cli_runner().invoke(args=["create-api-key", "two words"])
    assert result.exit_code != 0


# --- authentication -------------------------------------------------------------

@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer cbk_000000000000_not-a-key"},
    {"Authorization": "Bearer something-else"},
    {"Authorization": "Basic YWxpY2U6c2VjcmV0"},
], ids=["none", "empty", "unknown", "malformed", "basic"])
def test_a_missing_or_wrong_key_is_401_with_www_authenticate(secured_client, headers):
    answer = secured_client.post("/api/sessions", headers=headers)
    assert answer.status_code == 401
    assert answer.mimetype == "application/problem+json"
    assert answer.json["code"] == "unauthorized"
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")


def test_unknown_paths_and_methods_need_a_key_too(secured_client, keys):
    # Without a key nothing is told about what exists: 401 everywhere but the public views.
    assert secured_client.get("/api/nothing-here").status_code == 401
    assert secured_client.put("/api/sessions").status_code == 401
    assert secured_client.get("/api/chat/ws").status_code == 401   # a plain GET of the WebSocket
    alice = keys("alice")
    assert secured_client.get("/api/nothing-here", headers=alice).json["code"] == "not_found"
    assert secured_client.put("/api/sessions", headers=alice).json["code"] == "method_not_allowed"


def test_a_right_key_id_with_a_wrong_secret_is_401(secured_client, keys):
    key = keys("erin")["Authorization"].split()[1]
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    assert secured_client.post("/api/sessions", headers=bearer(forged)).status_code == 401


def test_keys_are_compared_in_constant_time(secured_client, keys, monkeypatch):
    calls = []
    real = access.hmac.compare_digest
    monkeypatch.setattr(access.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    key = keys("frank")["Authorization"].split()[1]
    secured_client.post("/api/sessions", headers=bearer(key[:-1] + "x"))
    secured_client.post("/api/sessions", headers=bearer(key))
    assert len(calls) == 2


def test_health_and_the_openapi_description_need_no_key_and_show_no_secret(secured, secured_client, keys):
    key = keys("grace")["Authorization"].split()[1]
    health = secured_client.get("/api/health")
    assert health.status_code == 200 and health.json["auth"] == "required"
    doc = secured_client.get("/api/openapi.json")
    assert doc.status_code == 200
    (salt, key_hash), = rows(secured, "SELECT salt, hash FROM api_keys")
    for text in (health.get_data(as_text=True), doc.get_data(as_text=True)):
        assert key not in text and key_hash not in text and salt not in text


def test_with_auth_disabled_everything_is_the_local_owner_and_it_says_so(make_app, caplog):
    with caplog.at_level(logging.WARNING):
        app = make_app(AUTH="disabled")
    assert "CHATBOT_AUTH=disabled" in caplog.text
    client = app.test_client()
    assert client.get("/api/health").json["auth"] == "disabled"
    sid = client.post("/api/sessions").json["session_id"]
    assert client.get(f"/api/sessions/{sid}").status_code == 200

    # Turned on later, the sessions made meanwhile belong to a key named 'local'.
    secured = make_app(AUTH="required")
    local = bearer(new_api_key(secured.config["DATABASE"], "local"))
    other = bearer(new_api_key(secured.config["DATABASE"], "other"))
    assert secured.test_client().get(f"/api/sessions/{sid}", headers=local).status_code == 200
    assert secured.test_client().get(f"/api/sessions/{sid}", headers=other).status_code == 404


def test_an_unknown_auth_mode_is_refused_at_start(make_app):
    with pytest.raises(ValueError):
        make_app(AUTH="maybe")


# --- isolation ----------------------------------------------------------------------

# Bodies for endpoints that need one to reach their session (default: none, or {}).
BODIES = {
    "chat.chat": lambda sid: {"session_id": sid, "message": "hello"},
    "chat.chat_stream": lambda sid: {"session_id": sid, "message": "hello"},
}


def session_requests(app, sid):
    """(endpoint, method, path, json body) for every route that reaches a session:
    read from the URL map, so a new endpoint is covered without editing this test."""
    found = []
    for rule in app.url_map.iter_rules():
        takes_path_id = "session_id" in rule.arguments
        if not (takes_path_id or rule.endpoint in BODIES):
            continue
        path = rule.rule.replace("<session_id>", sid)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}, key=lambda m: m == "DELETE"):
            body = BODIES[rule.endpoint](sid) if rule.endpoint in BODIES else (
                {} if method in ("POST", "PUT", "PATCH") else None)
            found.append((rule.endpoint, method, path, body))
    return sorted(found, key=lambda r: r[1] == "DELETE")  # deletions last


def call(client, method, path, body, headers):
    answer = client.open(path, method=method, json=body, headers=headers)
    answer.get_data()  # reads a stream to its end
    return answer


def test_another_keys_session_is_not_found_on_every_endpoint(secured, secured_client, keys):
    alice, mallory = keys("alice"), keys("mallory")
    sid = secured_client.post("/api/sessions", headers=alice, json={"metadata": {"secret": "x"}}).json["session_id"]
    unknown = str(uuid.uuid4())
    reached = session_requests(secured, sid)
    assert {"sessions.get", "sessions.patch", "sessions.delete", "sessions.messages", "sessions.export",
            "chat.chat", "chat.chat_stream", "chat.stop"} <= {r[0] for r in reached}

    for endpoint, method, path, body in reached:
        theirs = call(secured_client, method, path, body, mallory)
        assert theirs.status_code == 404, (endpoint, method, theirs.json)
        assert theirs.json["code"] == "session_not_found"
        # Exactly what a session that does not exist gets: nothing tells them apart.
        missing = call(secured_client, method, path.replace(sid, unknown),
                       BODIES[endpoint](unknown) if endpoint in BODIES else body, mallory)
        assert theirs.json == {**missing.json, "detail": missing.json["detail"].replace(unknown, sid)}

    for path in ("/api/chat", "/api/chat/stream"):
        regenerate = call(secured_client, "POST", path, {"session_id": sid, "regenerate": True}, mallory)
        assert regenerate.status_code == 404 and regenerate.json["code"] == "session_not_found"

    # Nothing Mallory sent reached Alice's session.
    mine = secured_client.get(f"/api/sessions/{sid}", headers=alice)
    assert mine.status_code == 200 and mine.json["message_count"] == 0

    for endpoint, method, path, body in reached:
        answer = call(secured_client, method, path, body, alice)
        # Alice's session is found (a re-attach then looks for the reply in it).
        assert answer.status_code != 404 or answer.json["code"] == "message_not_found", (endpoint, method)


def test_the_session_list_shows_only_the_callers_sessions(secured_client, keys):
    alice, bob = keys("alice"), keys("bob")
    mine = {secured_client.post("/api/sessions", headers=alice).json["session_id"] for _ in range(3)}
    theirs = {secured_client.post("/api/sessions", headers=bob).json["session_id"] for _ in range(2)}

    def listed(headers):
        found, cursor = [], None
        while True:   # every page, one session at a time, so the cursor is used too
            page = secured_client.get("/api/sessions", headers=headers,
                                      query_string={"limit": 1, **({"cursor": cursor} if cursor else {})}).json
            found += [s["session_id"] for s in page["sessions"]]
            cursor = page["next_cursor"]
            if cursor is None:
                return found
    assert sorted(listed(alice)) == sorted(mine)
    assert sorted(listed(bob)) == sorted(theirs)
    # A cursor of Bob's list is good for Bob only.
    first = secured_client.get("/api/sessions?limit=1", headers=bob).json["next_cursor"]
    answer = secured_client.get("/api/sessions", headers=alice, query_string={"cursor": first})
    assert answer.status_code == 400 and answer.json["code"] == "invalid_cursor"


def test_an_import_belongs_to_the_key_that_imported_it(secured_client, keys):
    alice, bob = keys("alice"), keys("bob")
    document = {"format": "chatbot-conversation", "version": 1, "session": {"title": "옮긴 대화"},
                "messages": [{"role": "user", "content": "hi", "created_at": "2026-01-02T03:04:05+09:00"}]}
    sid = secured_client.post("/api/sessions/import", json=document, headers=alice).json["session_id"]
    assert secured_client.get(f"/api/sessions/{sid}", headers=alice).status_code == 200
    assert secured_client.get(f"/api/sessions/{sid}", headers=bob).json["code"] == "session_not_found"
    assert secured_client.get("/api/sessions", headers=bob).json["sessions"] == []


# --- CORS ----------------------------------------------------------------------------

ORIGIN = "https://chat.example.com"


def test_cors_is_off_by_default(secured_client):
    answer = secured_client.get("/api/health", headers={"Origin": ORIGIN})
    assert "Access-Control-Allow-Origin" not in answer.headers
    preflight = secured_client.options("/api/sessions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in preflight.headers


def test_configured_origins_get_cors_headers_and_preflights_need_no_key(make_app):
    app = make_app(AUTH="required", CORS_ORIGINS=f"{ORIGIN}, https://other.example.com")
    client = app.test_client()
    preflight = client.options("/api/chat/stream", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"].lower()
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]

    # A browser can read a 401 and its Retry-After / WWW-Authenticate.
    refused = client.post("/api/sessions", headers={"Origin": ORIGIN})
    assert refused.status_code == 401
    assert refused.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "www-authenticate" in refused.headers["Access-Control-Expose-Headers"].lower()

    stranger = client.get("/api/health", headers={"Origin": "https://evil.example.net"})
    assert "Access-Control-Allow-Origin" not in stranger.headers


# --- the WebSocket (a real gunicorn process) -------------------------------------------

def ws_connect(server, headers):
    return websocket.create_connection(server.url.replace("http", "ws") + "/api/chat/ws", timeout=15,
                                       header=[f"{k}: {v}" for k, v in headers.items()])


def test_the_websocket_needs_a_key_and_reaches_only_its_own_sessions(start_server):
    server = start_server(CHATBOT_AUTH="required")
    alice, mallory = server.new_key("alice"), server.new_key("mallory")
    sid = server.new_session(alice)

    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        ws_connect(server, {})
    assert refused.value.status_code == 401

    ws = ws_connect(server, mallory)
    try:
        ws.send(json.dumps({"type": "chat", "session_id": sid, "message": "hi"}))
        error = json.loads(ws.recv())
        assert error["type"] == "error" and error["code"] == "session_not_found"
    finally:
        ws.close()
    assert server.get(f"/api/sessions/{sid}", headers=alice)["message_count"] == 0

    ws = ws_connect(server, alice)
    try:
        ws.send(json.dumps({"type": "chat", "session_id": sid, "message": "hi @@words=2"}))
        frames = [json.loads(ws.recv()) for _ in range(4)]
        assert [f["type"] for f in frames] == ["start", "delta", "delta", "done"]
    finally:
        ws.close()
