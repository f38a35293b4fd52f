"""Every error is application/problem+json with the contract's code; nothing a
client can send gets a 500, an HTML page or a traceback."""
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import assert_problem

DEAD_LLM = "http://127.0.0.1:9"  # nothing listens on the discard port


@pytest.fixture
def offline_client(make_app):
    """A service whose LLM server cannot be reached, failing at once (no retries)."""
    return make_app(LLM_URL=DEAD_LLM, LLM_CONNECT_RETRIES=0).test_client()


# --- the body ------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/api/chat", "/api/chat/stream", "/api/sessions"])
def test_malformed_json_is_invalid_json(client, path):
    response = client.post(path, data='{"session_id": "x", "message": ', content_type="application/json")
    assert_problem(response, 400, "invalid_json")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_body_that_is_not_json_is_unsupported_media_type(client, session_id, content_type):
    body = json.dumps({"session_id": session_id, "message": "hi"})
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/api/chat", data=body, headers=headers)
    assert_problem(response, 415, "unsupported_media_type")


@pytest.mark.parametrize("body, field", [
    ({}, "session_id"),
    ({"message": "hi"}, "session_id"),
    ({"session_id": "S"}, "message"),
    ({"session_id": "S", "message": ""}, "message"),
    ({"session_id": "S", "message": " \n\t "}, "message"),
    ({"session_id": "S", "message": 42}, "message"),
    ({"session_id": "S", "message": "hi", "max_new_tokens": 0}, "max_new_tokens"),
    ({"session_id": "S", "message": "hi", "max_new_tokens": 10 ** 9}, "max_new_tokens"),
    ({"session_id": "S", "message": "hi", "temperature": -1}, "temperature"),
    ({"session_id": "S", "message": "hi", "temperature": 99}, "temperature"),
    ({"session_id": "S", "message": "hi", "surprise": 1}, "surprise"),
])
def test_a_body_of_the_wrong_shape_names_the_failing_field(client, session_id, body, field):
    if body.get("session_id") == "S":
        body["session_id"] = session_id
    response = client.post("/api/chat", json=body)
    problem = assert_problem(response, 422, "validation_error")
    assert field in [e["field"] for e in problem["errors"]]
    assert all(e["detail"] for e in problem["errors"])


@pytest.mark.parametrize("body", [[], "text", 3, True])
def test_json_that_is_not_an_object_is_a_validation_error(client, body):
    assert_problem(client.post("/api/chat", json=body), 422, "validation_error")


def test_a_message_over_the_configured_length_is_refused(app, client, session_id):
    app.config["MAX_MESSAGE_CHARS"] = 100
    assert client.post("/api/chat", json={"session_id": session_id, "message": "가" * 100}).status_code == 200
    response = client.post("/api/chat", json={"session_id": session_id, "message": "가" * 101})
    problem = assert_problem(response, 422, "validation_error")
    assert [e["field"] for e in problem["errors"]] == ["message"]


def test_a_message_over_the_context_budget_is_refused_before_anything_is_stored(app, client, session_id):
    app.config["MAX_MESSAGE_CHARS"] = 100_000
    response = client.post("/api/chat", json={"session_id": session_id, "message": "word " * 20_000})
    assert_problem(response, 422, "validation_error")
    assert client.get(f"/api/sessions/{session_id}/messages").json["messages"] == []


def test_a_body_over_the_size_limit_is_payload_too_large(app, client, session_id):
    body = json.dumps({"session_id": session_id, "message": "x" * app.config["MAX_CONTENT_LENGTH"]})
    assert_problem(client.post("/api/chat", data=body, content_type="application/json"), 413,
                   "payload_too_large")


@pytest.mark.parametrize("raw", [
    '{"session_id": "x", "message": "\\ud800"}',             # half a UTF-16 pair
    '{"metadata": {"\\udfff": 1}}',
    '{"session_id": "x", "message": ' + "[" * 5000 + "]" * 5000 + "}",  # deeper than json parses
], ids=["surrogate", "surrogate-key", "deep"])
def test_json_that_python_parses_badly_is_invalid_json_not_a_crash(client, raw):
    path = "/api/sessions" if "metadata" in raw else "/api/chat"
    assert_problem(client.post(path, data=raw, content_type="application/json"), 400, "invalid_json")


def test_a_lone_surrogate_in_a_real_sessions_message_is_refused(client, session_id):
    raw = '{"session_id": "%s", "message": "안녕 \\ud83d"}' % session_id
    assert_problem(client.post("/api/chat", data=raw, content_type="application/json"), 400, "invalid_json")
    assert client.get(f"/api/sessions/{session_id}/messages").json["messages"] == []


# --- paths and methods -----------------------------------------------------------

@pytest.mark.parametrize("method, path", [
    ("POST", "/api/chat"), ("POST", "/api/chat/stream"), ("GET", "/api/sessions/{}"),
    ("DELETE", "/api/sessions/{}"), ("GET", "/api/sessions/{}/messages"), ("POST", "/api/sessions/{}/stop"),
])
def test_an_unknown_session_is_session_not_found(client, method, path):
    unknown = "00000000-0000-4000-8000-000000000000"
    response = client.open(path.format(unknown), method=method,
                           json={"session_id": unknown, "message": "hi"} if "chat" in path else None)
    assert_problem(response, 404, "session_not_found")


@pytest.mark.parametrize("method, path", [
    ("GET", "/api/chat"), ("PUT", "/api/sessions"), ("POST", "/api/health"), ("GET", "/api/chat/stream"),
])
def test_a_wrong_method_is_method_not_allowed(client, method, path):
    response = client.open(path, method=method)
    assert_problem(response, 405, "method_not_allowed")
    assert response.headers["Allow"]


@pytest.mark.parametrize("path", ["/nothing", "/api", "/api/nothing", "/api/sessions/x/y", "/static/x.css"])
def test_an_unknown_path_is_not_found(client, path):
    assert_problem(client.get(path), 404, "not_found")


def test_an_unexpected_exception_is_a_problem_without_a_traceback(make_app):
    app = make_app(TESTING=False)

    @app.get("/boom")
    def boom():
        raise RuntimeError("secret internals")
    response = app.test_client().get("/boom")
    problem = assert_problem(response, 500, "internal_error")
    assert "secret" not in response.get_data(as_text=True) and "Traceback" not in problem["detail"]


# --- the upstream ----------------------------------------------------------------

@pytest.mark.parametrize("path", ["/api/chat", "/api/chat/stream"])
def test_an_unreachable_upstream_is_503_and_the_failed_reply_is_stored(offline_client, path):
    client = offline_client
    sid = client.post("/api/sessions").json["session_id"]
    problem = assert_problem(client.post(path, json={"session_id": sid, "message": "hi"}), 503,
                             "upstream_unavailable")
    user, reply = client.get(f"/api/sessions/{sid}/messages").json["messages"]
    assert user["role"] == "user" and user["content"] == "hi" and user["status"] == "complete"
    assert reply["message_id"] == problem["message_id"]
    assert reply["status"] == "failed" and reply["content"] == ""
    assert reply["error"]["code"] == "upstream_unavailable"


@pytest.mark.parametrize("path", ["/api/chat", "/api/chat/stream"])
@pytest.mark.parametrize("directive, status, code", [
    ("@@status=500", 502, "upstream_error"),
    ("@@status=500@text", 502, "upstream_error"),
    ("@@status=422", 502, "upstream_error"),
    ("@@status=503", 503, "upstream_unavailable"),
    ("@@status=504", 504, "upstream_timeout"),
])
def test_an_upstream_error_status_maps_to_the_contracts_code(client, session_id, path, directive, status, code):
    response = client.post(path, json={"session_id": session_id, "message": f"hi {directive}"})
    assert_problem(response, status, code)
    reply = client.get(f"/api/sessions/{session_id}/messages").json["messages"][-1]
    assert reply["status"] == "failed" and reply["error"]["code"] == code


def test_an_error_in_a_whole_answer_is_upstream_error(client, session_id):
    response = client.post("/api/chat", json={"session_id": session_id, "message": "hi @@error=0"})
    assert_problem(response, 502, "upstream_error")


def test_an_upstream_that_does_not_answer_in_time_is_504(app, client, session_id):
    app.config["LLM_FIRST_TOKEN_TIMEOUT"] = 0.5
    app.extensions["upstream"].first_token_timeout = 0.5
    response = client.post("/api/chat", json={"session_id": session_id, "message": "hi @@first=3"})
    assert_problem(response, 504, "upstream_timeout")
    reply = client.get(f"/api/sessions/{session_id}/messages").json["messages"][-1]
    assert reply["status"] == "failed" and reply["error"]["code"] == "upstream_timeout"


@pytest.mark.parametrize("path", ["/api/chat", "/api/chat/stream"])
@pytest.mark.parametrize("hang_connect, setting", [(True, "LLM_CONNECT_TIMEOUT"),
                                                   (False, "LLM_FIRST_TOKEN_TIMEOUT")])
def test_an_upstream_that_never_answers_is_504(make_app, silent_listener, path, hang_connect, setting):
    client = make_app(LLM_URL=silent_listener(hang_connect), **{setting: 0.3}).test_client()
    sid = client.post("/api/sessions").json["session_id"]
    assert_problem(client.post(path, json={"session_id": sid, "message": "hi"}), 504, "upstream_timeout")
    reply = client.get(f"/api/sessions/{sid}/messages").json["messages"][-1]
    assert reply["status"] == "failed" and reply["error"]["code"] == "upstream_timeout"


# --- whatever a client sends -------------------------------------------------------

# Any character, with a bias to the awkward ones: NUL, separators, a BOM, Hangul,
# and lone surrogates ("\\ud800" is valid JSON but not text).
chars = st.characters(exclude_categories=()) | st.sampled_from("\x00\n \u2028\ufeff가\ud800\udfff")
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(chars, max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(chars, max_size=8), inner, max_size=4),
    max_leaves=12,
)
chat_bodies = st.one_of(
    st.fixed_dictionaries({"session_id": st.just("SESSION") | st.text(chars, max_size=5),
                           "message": st.text(chars, max_size=30)},
                          optional={"max_new_tokens": st.integers(1, 5000) | json_values,
                                    "temperature": st.floats(0, 3) | json_values,
                                    "do_sample": st.booleans() | json_values}).map(json.dumps),
    st.dictionaries(st.sampled_from(["session_id", "message", "max_new_tokens", "temperature"])
                    | st.text(max_size=5), json_values, max_size=5).map(json.dumps),
    json_values.map(json.dumps),
    st.binary(max_size=40),
)
session_bodies = st.one_of(
    st.fixed_dictionaries({"metadata": json_values}).map(json.dumps),
    json_values.map(json.dumps),
    st.binary(max_size=40),
)
JSON_TYPES = ["application/json", "application/json; charset=utf-8"]
fuzz = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def assert_not_a_crash(response):
    if response.request.method == "HEAD":  # no body to look at
        assert response.status_code < 500
    elif response.status_code >= 400:
        problem = assert_problem(response, response.status_code, response.json["code"])
        # The only 5xx are about the (unreachable) LLM server, never about the request.
        assert response.status_code < 500 or problem["code"] == "upstream_unavailable", problem
    elif response.request.method == "OPTIONS":
        assert response.get_data() == b""
    else:
        assert response.content_type.startswith("application/json") or response.status_code == 204


def send(client, method, path, body, content_type):
    """Send `body` (SESSION stands for a real session's id) and check the answer."""
    sid = client.post("/api/sessions").json["session_id"]
    data = body.replace("SESSION", sid) if isinstance(body, str) else body
    headers = {"Content-Type": content_type} if content_type else {}
    assert_not_a_crash(client.open(path.replace("SESSION", sid), method=method, data=data, headers=headers))


@fuzz
@given(path=st.sampled_from(["/api/chat", "/api/chat/stream"]), content_type=st.sampled_from(JSON_TYPES),
       body=chat_bodies)
def test_no_chat_body_gets_a_500(offline_client, path, content_type, body):
    send(offline_client, "POST", path, body, content_type)


@fuzz
@given(content_type=st.sampled_from(JSON_TYPES), body=session_bodies)
def test_no_session_body_gets_a_500(offline_client, content_type, body):
    send(offline_client, "POST", "/api/sessions", body, content_type)


@fuzz
@given(method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]),
       path=st.sampled_from(["/api/chat", "/api/chat/stream", "/api/sessions", "/api/sessions/SESSION",
                             "/api/sessions/SESSION/messages", "/api/sessions/SESSION/stop",
                             "/api/health", "/api/x"]) | st.text(max_size=10).map(lambda t: "/api/" + t),
       content_type=st.sampled_from(JSON_TYPES + ["text/plain", "multipart/form-data", None]),
       body=chat_bodies | session_bodies)
def test_no_request_gets_a_500(offline_client, method, path, content_type, body):
    send(offline_client, method, path, body, content_type)
