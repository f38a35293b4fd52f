"""The default gunicorn configuration carries 200 concurrent streams.

Each streams 5 pieces a second (1000 a second in all, what a GPU server
busy with 200 users sends), so that the test measures the service, not
the stand-in and the test client sharing its two cores."""
import threading
import time

from conftest import SSEStream

STREAMS = 200


def test_200_concurrent_streams_all_complete_and_none_starves(start_server):
    server = start_server(CHATBOT_WORKERS=None, CHATBOT_THREADS=None)  # gunicorn.conf.py's defaults
    sessions = [server.new_session() for _ in range(STREAMS)]
    results = [None] * STREAMS
    go = threading.Event()

    def run(i):
        go.wait()
        try:
            stream = SSEStream(server.url, "/api/chat/stream",
                               {"session_id": sessions[i], "message": f"{i} @@words=80 @@delay=0.2"})
            events = list(stream.events())
            first_delta = next((t for name, _, t in events if name == "delta"), None)
            assert first_delta, (stream.status, stream.raw[:300])
            results[i] = (stream.status, events, first_delta, events[-1][2])
        except Exception as e:  # recorded, so the assertion below names it
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(STREAMS)]
    for t in threads:
        t.start()
    started = time.monotonic()
    go.set()
    for t in threads:
        t.join(120)

    failures = [r for r in results if not isinstance(r, tuple)]
    assert not failures, failures[:3]
    for status, events, _, _ in results:
        assert status == 200
        assert events[-1][0] == "done" and events[-1][1]["status"] == "complete"
        assert "".join(e[1]["content"] for e in events if e[0] == "delta") == events[-1][1]["content"]
    # No stream waited for another to finish: every one had started before any
    # ended (each lasts 16 s: far longer than the connection storm of 200 takes,
    # far shorter than a stream queued behind another would wait).
    firsts, ends = sorted(r[2] for r in results), sorted(r[3] for r in results)
    assert firsts[-1] < ends[0], (f"first deltas from {firsts[0] - started:.1f} s to {firsts[-1] - started:.1f} s "
                                  f"({sum(f > ends[0] for f in firsts)} after the first end), "
                                  f"ends from {ends[0] - started:.1f} s")
