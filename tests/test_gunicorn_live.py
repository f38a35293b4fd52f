"""gunicorn at its edges: many descriptors, its hooks, its settings, a reload."""
import os

from conftest import ROOT, SSEStream
from helpers import deltas

HELD_DESCRIPTORS = 1100


def config_holding_descriptors(tmp_path):
    """A gunicorn config: the project's, plus a worker that holds more than 1024
    descriptors, so that every client socket it accepts is numbered above 1024
    (as in a worker with a few hundred streams: each holds two sockets)."""
    path = tmp_path / "many_fds.conf.py"
    path.write_text(f"""
import os as _os
import resource as _resource

__file__ = {str(ROOT / "gunicorn.conf.py")!r}
exec(compile(open(__file__).read(), __file__, "exec"))
_project_post_worker_init = post_worker_init


def post_worker_init(worker):
    soft, hard = _resource.getrlimit(_resource.RLIMIT_NOFILE)
    if soft < 4096:
        _resource.setrlimit(_resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    worker.held_descriptors = [_os.open(_os.devnull, _os.O_RDONLY) for _ in range({HELD_DESCRIPTORS})]
    _project_post_worker_init(worker)
""")
    return path


def test_a_worker_with_more_than_1024_descriptors_keeps_its_streams(start_server, tmp_path):
    server = start_server(config=config_holding_descriptors(tmp_path), CHATBOT_WORKERS="1")
    (worker,) = server.worker_pids()
    assert len(os.listdir(f"/proc/{worker}/fd")) > HELD_DESCRIPTORS
    sid = server.new_session()
    # Longer than the half second after which a failing client watcher ends a stream.
    stream = SSEStream(server.url, "/api/chat/stream", {"session_id": sid, "message": "@@words=30 @@delay=0.05"})
    events = list(stream.events())
    assert events[-1][0] == "done", events[-1]
    done = events[-1][1]
    assert done["status"] == "complete" and done["finish_reason"] == "stop"
    assert deltas(events).split()[-30:] == [f"단어{i}" for i in range(1, 31)]
