"""POST /api/sessions/{id}/stop reaches the reply wherever it is generated."""
import requests

from conftest import SSEStream, wait_for
from helpers import in_thread


def test_stop_from_another_server_process_ends_the_stream_as_incomplete(start_server, standin_log):
    # Two gunicorn servers on one database: the stop request is certainly
    # handled by a different process from the one streaming.
    streaming = start_server()
    other = start_server(streaming.db_path)
    sid = streaming.new_session()
    stream = SSEStream(streaming.url, "/api/chat/stream",
                       {"session_id": sid, "message": "@@words=300 @@delay=0.05"})
    events = stream.events()
    assert next(events)[0] == "start"
    first = next(events)
    assert first[0] == "delta"

    answer = requests.post(f"{other.url}/api/sessions/{sid}/stop")
    assert answer.status_code == 202 and answer.json() == {"stopped": True}

    rest = list(events)
    name, done, _ = rest[-1]
    assert name == "done"
    assert done["status"] == "incomplete" and done["finish_reason"] == "stopped"
    deltas = first[1]["content"] + "".join(e[1]["content"] for e in rest if e[0] == "delta")
    assert done["content"] == deltas
    history = other.get(f"/api/sessions/{sid}/messages")["messages"]
    assert history[-1]["content"] == deltas and history[-1]["status"] == "incomplete"
    assert wait_for(lambda: standin_log()[-1]["state"] == "cancelled")
    assert standin_log()[-1]["pieces_sent"] < 300


def test_stop_with_nothing_running_is_409(server):
    sid = server.new_session()
    answer = requests.post(f"{server.url}/api/sessions/{sid}/stop")
    assert answer.status_code == 409
    assert answer.headers["Content-Type"] == "application/problem+json"
    assert answer.json()["code"] == "nothing_to_stop"


def test_stop_of_an_unknown_session_is_404(server):
    answer = requests.post(f"{server.url}/api/sessions/0c8c3c3e-0000-0000-0000-000000000000/stop")
    assert answer.status_code == 404 and answer.json()["code"] == "session_not_found"


def test_a_stopped_json_chat_returns_the_incomplete_reply(server):
    sid = server.new_session()
    import threading
    result = {}
    thread = threading.Thread(target=lambda: result.update(answer=requests.post(
        f"{server.url}/api/chat", json={"session_id": sid, "message": "@@first=30"})))
    thread.start()
    assert wait_for(lambda: requests.post(f"{server.url}/api/sessions/{sid}/stop").status_code == 202)
    thread.join(10)
    answer = result["answer"]
    assert answer.status_code == 200
    reply = answer.json()
    assert reply["finish_reason"] == "stopped" and reply["status"] == "failed"
    assert reply["error"]["code"] == "stopped"


def test_a_stop_reaches_an_upstream_that_has_not_answered_yet(server, standin_log):
    # The upstream holds its headers back (a request queued behind a busy model):
    # the stop must close that connection too, not only the turn.
    sid = server.new_session()
    answer = in_thread(requests.post, f"{server.url}/api/chat/stream",
                       json={"session_id": sid, "message": "@@headers=60"})
    assert wait_for(lambda: standin_log(), timeout=10)  # the request is upstream, waiting for its headers
    assert requests.post(f"{server.url}/api/sessions/{sid}/stop").status_code == 202
    assert answer().status_code == 200   # its one event says: stopped before any text
    assert wait_for(lambda: standin_log()[-1]["state"] == "cancelled", timeout=5)
