"""How the relay writes (issue 14), against a real server: deltas that were
waiting together go out in one write, each still its own SSE event with its
own id, and nothing is held back."""
import json
import socket

from conftest import SSEStream


def read_chunk(f):
    """One chunk of a chunked HTTP body (b"" for the last one)."""
    size = int(f.readline().split(b";")[0], 16)
    data = f.read(size)
    f.readline()
    return data


def sse_blocks(data):
    return [block for block in data.decode().split("\n\n") if block]


def fields(block):
    return dict(line.split(": ", 1) for line in block.split("\n") if not line.startswith(":"))


def test_deltas_waiting_together_go_out_in_one_write_each_with_its_own_id(start_server):
    server = start_server(CHATBOT_WORKERS="1")
    sid = server.new_session()
    live = SSEStream(server.url, "/api/chat/stream", {"session_id": sid, "message": "@@words=40 @@delay=0.05"})
    events = live.events()
    name, start, _ = next(events)
    assert name == "start"
    received = [next(events) for _ in range(8)]
    assert [name for name, _, _ in received] == ["delta"] * 8

    # A second client re-attaches from the beginning: the pieces so far are all waiting for it.
    with socket.create_connection((server.bind.split(":")[0], int(server.bind.split(":")[1])), timeout=30) as sock:
        sock.sendall(f"GET /api/sessions/{sid}/messages/{start['message_id']}/stream?after=0 HTTP/1.1\r\n"
                     f"Host: {server.bind}\r\nConnection: close\r\n\r\n".encode())
        f = sock.makefile("rb")
        assert b" 200 " in f.readline()
        while f.readline() not in (b"\r\n", b""):
            pass
        chunks = []
        while chunk := read_chunk(f):
            chunks.append(chunk)
    assert [fields(b)["event"] for b in sse_blocks(chunks[0])] == ["start"]
    caught_up = [fields(b) for b in sse_blocks(chunks[1])]
    # the pieces that were there went out in one write, each its own event with its own id
    assert len(caught_up) >= 8
    assert {f["event"] for f in caught_up} == {"delta"}
    ids = [int(f["id"]) for f in caught_up]
    text = "".join(json.loads(f["data"])["content"] for f in caught_up)
    assert ids == sorted(set(ids)) and ids[-1] == len(text)

    # The whole reply, read by the re-attached client, is the reply, with ids as positions.
    every = [fields(b) for chunk in chunks for b in sse_blocks(chunk) if not b.startswith("data: [DONE]")]
    deltas = [f for f in every if f["event"] == "delta"]
    whole = "".join(json.loads(f["data"])["content"] for f in deltas)
    assert every[-1]["event"] == "done"
    assert json.loads(every[-1]["data"])["content"] == whole
    position = 0
    for f in deltas:
        position += len(json.loads(f["data"])["content"])
        assert int(f["id"]) == position
    live.close()


def test_a_lone_delta_is_not_held_back(start_server):
    # One piece at a time, far apart: each is written as it arrives.
    server = start_server(CHATBOT_WORKERS="1")
    sid = server.new_session()
    live = SSEStream(server.url, "/api/chat/stream", {"session_id": sid, "message": "@@words=3 @@delay=1"})
    arrivals = [(name, at) for name, _, at in live.events() if name in ("delta", "done")]
    assert [name for name, _ in arrivals] == ["delta", "delta", "delta", "done"]
    gaps = [b - a for (_, a), (_, b) in zip(arrivals, arrivals[1:3])]
    assert all(gap > 0.5 for gap in gaps)   # the stand-in's second apart, not gathered at the end
    live.close()
