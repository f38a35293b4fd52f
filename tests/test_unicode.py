"""Any UTF-8 text goes through untouched; JSON that holds no text is refused."""
import json

import pytest

LONE = '"a\\ud800b"'  # JSON's escape for half of a UTF-16 pair


@pytest.mark.parametrize("path, body", [
    ("/api/chat", '{"session_id": "%s", "message": ' + LONE + '}'),
    ("/api/chat/stream", '{"session_id": "%s", "message": ' + LONE + '}'),
    ("/api/sessions", '{"metadata": {"k": ' + LONE + '}}'),
])
def test_an_unpaired_surrogate_is_invalid_json_not_a_500(client, session_id, path, body):
    answer = client.post(path, data=body.replace("%s", session_id), content_type="application/json")
    assert answer.status_code == 400
    assert answer.json["code"] == "invalid_json"
    messages = client.get(f"/api/sessions/{session_id}/messages").json["messages"]
    assert messages == []  # nothing was stored


def test_korean_and_emoji_round_trip_exactly(client, session_id):
    text = "안녕하세요 👋🏽 é (e\u0301) 日本語 @@words=2"
    answer = client.post("/api/chat", json={"session_id": session_id, "message": text})
    assert answer.status_code == 200
    stored = client.get(f"/api/sessions/{session_id}/messages").json["messages"]
    assert stored[0]["content"] == text
    raw = client.get(f"/api/sessions/{session_id}/messages").get_data()
    assert "안녕하세요".encode() in raw  # UTF-8 on the wire, not \\u escapes
    assert json.loads(raw)["messages"][0]["content"] == text
