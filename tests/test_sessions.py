"""Sessions: create, read, delete, and their message history (Flask test client)."""
import uuid

from helpers import assert_problem, is_iso_utc

MESSAGE_KEYS = {"message_id", "session_id", "role", "content", "created_at", "status", "token_usage"}


def test_create_a_session(client):
    response = client.post("/api/sessions")
    assert response.status_code == 201
    session = response.json
    uuid.UUID(session["session_id"])
    assert is_iso_utc(session["created_at"]) and session["last_accessed"] == session["created_at"]
    assert session["metadata"] == {}


def test_a_session_keeps_its_metadata(client):
    metadata = {"user": "민수", "tags": ["a", 1], "nested": {"ok": True}}
    session_id = client.post("/api/sessions", json={"metadata": metadata}).json["session_id"]
    assert client.get(f"/api/sessions/{session_id}").json["metadata"] == metadata


def test_metadata_must_be_an_object(client):
    problem = assert_problem(client.post("/api/sessions", json={"metadata": [1]}), 422, "validation_error")
    assert problem["errors"][0]["field"] == "metadata"


def test_get_a_session_counts_its_messages(client, session_id):
    assert client.get(f"/api/sessions/{session_id}").json["message_count"] == 0
    client.post("/api/chat", json={"session_id": session_id, "message": "hi @@words=2"})
    session = client.get(f"/api/sessions/{session_id}").json
    assert session["session_id"] == session_id and session["message_count"] == 2


def test_delete_a_session(client, session_id):
    response = client.delete(f"/api/sessions/{session_id}")
    assert response.status_code == 204 and response.get_data() == b""
    assert_problem(client.get(f"/api/sessions/{session_id}"), 404, "session_not_found")
    assert_problem(client.get(f"/api/sessions/{session_id}/messages"), 404, "session_not_found")
    assert_problem(client.delete(f"/api/sessions/{session_id}"), 404, "session_not_found")


def test_messages_are_listed_oldest_first_with_the_contracts_shape(client, session_id):
    for text in ("첫째 @@words=1", "second @@words=2"):
        assert client.post("/api/chat", json={"session_id": session_id, "message": text}).status_code == 200
    body = client.get(f"/api/sessions/{session_id}/messages").json
    assert body["session_id"] == session_id
    messages = body["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in messages[::2]] == ["첫째 @@words=1", "second @@words=2"]
    for m in messages:
        assert MESSAGE_KEYS <= m.keys() and m["session_id"] == session_id and m["status"] == "complete"
        uuid.UUID(m["message_id"])
        assert is_iso_utc(m["created_at"])
    assert messages[0]["token_usage"] is None
    assert set(messages[1]["token_usage"]) >= {"prompt_tokens", "completion_tokens", "total_tokens"}


def test_sessions_do_not_see_each_others_messages(client, session_id):
    other = client.post("/api/sessions").json["session_id"]
    client.post("/api/chat", json={"session_id": session_id, "message": "mine @@words=1"})
    assert client.get(f"/api/sessions/{other}/messages").json["messages"] == []
