"""gunicorn at its edges: many descriptors, its hooks, its settings, a reload."""
import os
import shutil
import signal

import requests

from chatbot import DEFAULTS, db

from conftest import ROOT, SSEStream, wait_for
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


def test_a_database_error_when_a_worker_dies_neither_stops_nor_blocks_the_master(start_server):
    server = start_server(CHATBOT_WORKERS="1")
    (worker,) = server.worker_pids()
    # Another process holds the database's write lock (longer than child_exit may wait).
    holder = db.connect(server.db_path)
    if holder.engine == "sqlite":
        holder.execute("BEGIN IMMEDIATE")
    else:
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE")
    try:
        os.kill(worker, signal.SIGKILL)
        # Replaced well before the 15 s a request would wait for the database.
        assert wait_for(lambda: server.worker_pids() not in ([], [worker]), timeout=10), server.output()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert requests.get(server.url + "/api/health").status_code == 200
    assert server.proc.poll() is None
    assert f"could not release the replies of worker {worker}" in server.output()


def test_threads_and_graceful_timeout_from_gunicorns_options_are_the_ones_used(start_server):
    # --threads below the settings' THREADS (256 by default) used to leave the
    # thread barrier waiting for threads that do not exist, until the worker died.
    server = start_server(CHATBOT_THREADS=None, CHATBOT_WORKERS="1",
                          GUNICORN_CMD_ARGS="--threads 4 --graceful-timeout 3")
    sid = server.new_session()
    stream = SSEStream(server.url, "/api/chat/stream", {"session_id": sid, "message": "@@words=400 @@delay=0.05"})
    events = stream.events()
    assert next(events)[0] == "start"
    server.proc.send_signal(signal.SIGTERM)
    # Ended by us before gunicorn's kill at 3 s, not by the kill itself.
    name, done, _ = list(events)[-1]
    assert name == "done" and done["status"] == "incomplete" and done["finish_reason"] == "shutdown"


def tunables_of(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        variables = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
    return variables.get(b"GLIBC_TUNABLES", b"").decode()


def test_workers_run_without_glibcs_per_thread_malloc_caches(start_server):
    # A thread per open stream, each with its own cache of freed blocks, was
    # most of a stream's memory (bench/README.md). The master runs itself
    # again with the tunables: the same process, so the pid is the one started.
    server = start_server(CHATBOT_WORKERS="1")
    (worker,) = server.worker_pids()
    assert "glibc.malloc.tcache_count=0" in tunables_of(server.proc.pid).split(":")
    assert "glibc.malloc.tcache_count=0" in tunables_of(worker).split(":")
    assert server.get("/api/health")["database"]["ok"]


def test_an_operators_own_glibc_tunables_are_left_as_they_are(start_server):
    server = start_server(CHATBOT_WORKERS="1", GLIBC_TUNABLES="glibc.malloc.tcache_count=3")
    (worker,) = server.worker_pids()
    assert tunables_of(worker) == "glibc.malloc.tcache_count=3"


def project_copy(tmp_path):
    """The service's files in a directory of their own, to change them."""
    app = tmp_path / "app"
    shutil.copytree(ROOT / "chatbot", app / "chatbot", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("wsgi.py", "gunicorn.conf.py", "schema.sql", "schema-postgresql.sql"):
        shutil.copy(ROOT / name, app / name)
    return app


def test_sighup_reloads_the_code_and_the_settings(start_server, tmp_path, standin_log):
    app = project_copy(tmp_path)
    server = start_server(cwd=app, CHATBOT_WORKERS="1")
    (worker,) = server.worker_pids()
    sid = server.new_session()
    assert requests.post(server.url + "/api/chat", json={"session_id": sid, "message": "before"}).status_code == 200
    assert standin_log()[-1]["body"]["messages"][0]["content"] == DEFAULTS["SYSTEM_PROMPT"]

    # A new setting in .env, and a change of code.
    (app / ".env").write_text("CHATBOT_MAX_MESSAGE_CHARS=10\n")
    with open(app / "chatbot" / "__init__.py", "a") as f:
        f.write('\nDEFAULTS["SYSTEM_PROMPT"] = "Reloaded."\n')
    server.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: server.worker_pids() not in ([], [worker]), timeout=20)
    answer = wait_for(lambda: requests.post(server.url + "/api/chat",
                                            json={"session_id": sid, "message": "after"}), timeout=10)
    assert answer.status_code == 200
    assert standin_log()[-1]["body"]["messages"][0]["content"] == "Reloaded."
    too_long = requests.post(server.url + "/api/chat", json={"session_id": sid, "message": "x" * 11})
    assert too_long.status_code == 422
