from conftest import SSEStream


def test_a_streamed_korean_answer_arrives_event_by_event(server):
    sid = server.new_session()
    stream = SSEStream(server.url, "/api/chat/stream", {"session_id": sid, "message": "안녕 @@split"})
    assert stream.status == 200
    events = list(stream.events())
    assert events[0][0] == "start"
    assert events[-1][0] == "done"
    deltas = "".join(e[1]["content"] for e in events if e[0] == "delta")
    assert deltas == events[-1][1]["content"]
