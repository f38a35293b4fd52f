"""What clients of the original backend send and read, besides the stream
itself (see test_seed_system_live.py): use_rag and top_k on a chat,
total_count on a history, the original health fields, and the event models."""
import json

import pytest

from chatbot import models
from helpers import is_iso_utc


def chat(client, path, session_id, **fields):
    return client.post(path, json={"session_id": session_id, "message": "안녕 @@words=2", **fields})


def sse_objects(response):
    """(event name, data) of each block; [DONE] as ("[DONE]", None)."""
    found = []
    for block in response.get_data(as_text=True).strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n") if not line.startswith(":"))
        data = fields["data"]
        found.append(("[DONE]", None) if data == "[DONE]" else (fields["event"], json.loads(data)))
    return found


@pytest.mark.parametrize("path", ["/api/chat", "/api/chat/stream"])
@pytest.mark.parametrize("fields", [{"use_rag": False}, {"top_k": 5}, {"use_rag": False, "top_k": 3},
                                    {"use_rag": False, "top_k": None}])
def test_use_rag_false_and_top_k_are_accepted_and_ignored(client, session_id, standin_log, path, fields):
    response = chat(client, path, session_id, **fields)
    assert response.status_code == 200
    assert not {"use_rag", "top_k"} & set(standin_log()[-1]["body"])


@pytest.mark.parametrize("path", ["/api/chat", "/api/chat/stream"])
def test_use_rag_true_is_refused_as_retrieval_is_not_part_of_this_service(client, session_id, standin_log, path):
    response = chat(client, path, session_id, use_rag=True, top_k=5)
    assert response.status_code == 422 and response.json["code"] == "validation_error"
    [error] = response.json["errors"]
    assert error["field"] == "use_rag" and "retrieval" in error["detail"] and "not part of this service" in error[
        "detail"]
    assert client.get(f"/api/sessions/{session_id}/messages").json["messages"] == [] and standin_log() == []


@pytest.mark.parametrize("fields", [{"use_rag": "false"}, {"use_rag": 0}, {"top_k": "5"}, {"top_k": -1}])
def test_bad_use_rag_or_top_k_is_a_validation_error(client, session_id, fields):
    response = chat(client, "/api/chat", session_id, **fields)
    assert response.status_code == 422 and response.json["errors"][0]["field"] == next(iter(fields))


def test_the_description_says_so(client):
    chat_request = client.get("/api/openapi.json").json["components"]["schemas"]["ChatRequest"]["properties"]
    assert chat_request["use_rag"]["const"] is False and "retrieval" in chat_request["use_rag"]["description"]
    assert "top_k" in chat_request


def test_the_history_carries_the_sessions_total_count_on_every_page(client, session_id):
    for n in range(3):
        assert chat(client, "/api/chat", session_id).status_code == 200
    whole = client.get(f"/api/sessions/{session_id}/messages").json
    assert len(whole["messages"]) == whole["total_count"] == 6
    page = client.get(f"/api/sessions/{session_id}/messages?limit=2").json
    assert len(page["messages"]) == 2 and page["has_more"] and page["total_count"] == 6
    older = client.get(f"/api/sessions/{session_id}/messages?limit=2&before={page['messages'][0]['message_id']}")
    assert older.json["total_count"] == 6
    empty = client.post("/api/sessions").json["session_id"]
    assert client.get(f"/api/sessions/{empty}/messages").json["total_count"] == 0


def test_health_carries_the_original_backends_fields(client):
    body = client.get("/api/health").json
    assert body["llm_server_available"] is True and body["database_connected"] is True
    assert is_iso_utc(body["timestamp"])
    models.Health.model_validate(body)


def test_health_fields_when_things_are_down(make_app, app, tmp_path):
    body = make_app(LLM_URL="http://127.0.0.1:9").test_client().get("/api/health").json
    assert body["llm_server_available"] is False and body["database_connected"] is True
    app.config["DATABASE"] = str(tmp_path)  # a directory: SQLite cannot open it
    response = app.test_client().get("/api/health")
    assert response.status_code == 503
    assert response.json["database_connected"] is False and is_iso_utc(response.json["timestamp"])


def test_each_event_matches_its_model_and_done_comes_last(client, session_id):
    found = sse_objects(chat(client, "/api/chat/stream", session_id))
    assert [name for name, _ in found] == ["start", "delta", "delta", "done", "[DONE]"]
    models.StreamStart.model_validate(found[0][1])
    for _, delta in found[1:3]:
        assert models.StreamDelta.model_validate(delta).type == "token"
    done = models.StreamDone.model_validate(found[3][1])
    assert done.type == "complete" and done.content == found[1][1]["content"] + found[2][1]["content"]

    found = sse_objects(client.post("/api/chat/stream", json={"session_id": session_id,
                                                              "message": "@@words=3 @@error=1"}))
    assert [name for name, _ in found] == ["start", "delta", "error", "[DONE]"]
    error = models.StreamError.model_validate(found[2][1])
    assert error.code == "upstream_error" and error.message == error.detail
