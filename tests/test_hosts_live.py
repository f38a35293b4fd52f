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
