"""Two "hosts": two gunicorn masters (separate process trees, separate ports)
sharing one database, as two machines behind one load balancer share
PostgreSQL. Every promise of one host must hold across them."""
import threading

import pytest
import requests

from helpers import assert_problem, rows


@pytest.fixture
def two_hosts(start_server):
    """Two gunicorn masters on one database of the test's engine."""
    first = start_server()
    return first, start_server(first.db_path)


def test_one_reply_at_a_time_per_session_across_hosts(two_hosts):
    hosts = two_hosts
    sid = hosts[0].new_session()
    go = threading.Barrier(20)
    answers = [None] * 20

    def chat(i):
        go.wait()
        answers[i] = requests.post(hosts[i % 2].url + "/api/chat/stream", stream=True, timeout=90,
                                   json={"session_id": sid, "message": f"{i} @@words=500 @@delay=0.1"})
    threads = [threading.Thread(target=chat, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    statuses = [a.status_code for a in answers]
    assert statuses.count(200) == 1, statuses   # the winner streams for 50 s: all others came meanwhile
    for answer in answers:
        if answer.status_code != 200:
            assert_problem(answer, 409, "generation_in_progress")
    [won] = [a for a in answers if a.status_code == 200]
    assert requests.post(f"{hosts[1].url}/api/sessions/{sid}/stop").status_code == 202
    assert "event: done" in won.text and '"finish_reason": "stopped"' in won.text
    assert rows(hosts[0].db_path, "SELECT role, status FROM messages WHERE session_id = ? ORDER BY seq", sid) == [
        {"role": "user", "status": "complete"}, {"role": "assistant", "status": "incomplete"}]


def test_per_key_limits_are_shared_by_the_hosts(start_server):
    limits = {"CHATBOT_AUTH": "required", "CHATBOT_RATE_LIMIT_PER_MINUTE": "8", "CHATBOT_MAX_STREAMS_PER_KEY": "1"}
    a = start_server(**limits)
    b = start_server(a.db_path, **limits)
    alice = a.new_key("alice")
    first, second = a.new_session(alice), b.new_session(alice)            # requests 1, 2
    running = requests.post(a.url + "/api/chat/stream", headers=alice, stream=True,    # 3
                            json={"session_id": first, "message": "@@words=200 @@delay=0.05"})
    assert running.status_code == 200
    # One running reply per key, whichever host is asked.
    assert_problem(requests.post(b.url + "/api/chat", headers=alice,                   # 4
                                 json={"session_id": second, "message": "hi"}), 429, "too_many_streams")
    running.close()
    # Eight requests a minute for the key, counted on both hosts together.
    answers = [requests.get(host.url + "/api/sessions", headers=alice) for host in (a, b, a, b, a, b)]
    assert [r.status_code for r in answers[:4]] == [200] * 4                           # 5-8
    for r in answers[4:]:
        assert_problem(r, 429, "rate_limited")
