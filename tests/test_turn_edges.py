"""Edges of one turn: the upstream's usage in our shape; no marker left behind."""
import pytest

from chatbot import context, llm


@pytest.mark.parametrize("raw, expected", [
    ({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}, {"prompt_tokens": 3, "completion_tokens": 4,
                                                                       "total_tokens": 7}),
    ({"prompt_tokens": 3, "completion_tokens": 4}, {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}),
    ({"input_tokens": 3, "output_tokens": 4}, None),      # another vendor's shape: we estimate instead
    ({"prompt_tokens": "3", "completion_tokens": 4}, None),
    ({"prompt_tokens": True, "completion_tokens": 4}, None),
    ("12", None),
    (None, None),
])
def test_the_upstreams_usage_is_kept_only_in_our_shape(raw, expected):
    assert llm.token_usage(raw) == expected


def test_a_foreign_usage_shape_is_replaced_by_an_estimate(client, session_id, monkeypatch):
    monkeypatch.setattr(llm, "parse_whole", lambda protocol, obj: llm.Chunk("hi", llm.token_usage({"x": 1}), "stop"))
    reply = client.post("/api/chat", json={"session_id": session_id, "message": "hello"}).json
    assert reply["token_usage"]["estimated"] is True


def test_a_failure_after_the_turn_began_leaves_no_marker(client, session_id, monkeypatch):
    def broken(*args):
        raise RuntimeError("boom")
    monkeypatch.setattr(context, "build", broken)
    answer = client.post("/api/chat", json={"session_id": session_id, "message": "hello"})
    assert answer.status_code == 500 and answer.json["code"] == "internal_error"
    monkeypatch.undo()
    again = client.post("/api/chat", json={"session_id": session_id, "message": "hello again @@words=2"})
    assert again.status_code == 200  # not 409 generation_in_progress
    statuses = [m["status"] for m in client.get(f"/api/sessions/{session_id}/messages").json["messages"]]
    assert statuses == ["complete", "failed", "complete", "complete"]
