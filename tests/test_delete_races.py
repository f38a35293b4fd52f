"""A session deleted while another request works on it: a clean 404, never a 500."""
import pytest

from chatbot import sessions, store, turns
from chatbot.access import current_owner
from chatbot.db import get_db

from conftest import wait_for
from helpers import assert_problem, in_thread, rows, sse_events


@pytest.fixture
def deleted_after_check(monkeypatch):
    """After the first session check of a request passes, the session is
    deleted, as by a DELETE that lands just then."""
    def delete(session_id):
        store.delete_session(get_db(), session_id, current_owner())

    real_session_of, real_session_or_404 = turns.session_of, sessions.session_or_404
    checked = set()

    def session_of(conn, session_id, owner):
        session = real_session_of(conn, session_id, owner)
        if session_id not in checked:
            checked.add(session_id)
            delete(session_id)
        return session

    def session_or_404(session_id):
        session = real_session_or_404(session_id)
        delete(session_id)
        return session
    monkeypatch.setattr(turns, "session_of", session_of)
    monkeypatch.setattr(sessions, "session_or_404", session_or_404)


@pytest.mark.parametrize("path", ["/api/chat", "/api/chat/stream"])
def test_a_chat_in_a_session_deleted_after_its_check_is_404(client, session_id, deleted_after_check, path):
    response = client.post(path, json={"session_id": session_id, "message": "hello"})
    assert_problem(response, 404, "session_not_found")


def test_a_patch_of_a_session_deleted_after_its_check_is_404(client, session_id, deleted_after_check):
    response = client.patch(f"/api/sessions/{session_id}", json={"title": "new"})
    assert_problem(response, 404, "session_not_found")


def test_a_stop_in_a_session_deleted_after_its_check_is_404(client, session_id, deleted_after_check):
    assert_problem(client.post(f"/api/sessions/{session_id}/stop"), 404, "session_not_found")


def generating(app, session_id):
    return rows(app.config["DATABASE"], "SELECT generating_message_id FROM sessions WHERE session_id = ?",
                session_id)[0]["generating_message_id"]


def test_a_plain_chat_whose_session_is_deleted_meanwhile_is_404(app, client, session_id):
    # Not streamed upstream: the stand-in answers after @@first seconds.
    answer = in_thread(client.post, "/api/chat", json={"session_id": session_id, "message": "@@first=2"})
    assert wait_for(lambda: generating(app, session_id))
    assert app.test_client().delete(f"/api/sessions/{session_id}").status_code == 204
    assert_problem(answer(), 404, "message_not_found")


def test_a_stream_whose_session_is_deleted_meanwhile_ends_with_an_error_event(app, client, session_id):
    response = client.post("/api/chat/stream", json={"session_id": session_id,
                                                     "message": "@@words=40 @@delay=0.05"}, buffered=False)
    assert response.status_code == 200
    chunks = iter(response.response)
    assert b"event: start" in next(chunks)
    assert app.test_client().delete(f"/api/sessions/{session_id}").status_code == 204
    name, data = sse_events(b"".join(chunks))[-1]
    assert name == "error" and data["code"] == "message_not_found"
    response.close()
