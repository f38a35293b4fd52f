"""gunicorn settings. Each open stream holds one thread for its whole length,
so workers x threads is the number of streams that can run at once.

The values come from the CHATBOT_* settings (and .env), checked by the same
model as the app's (chatbot/settings.py). gunicorn's own options (--threads,
GUNICORN_CMD_ARGS) still override them; the hooks below read the values in
force from worker.cfg.

Nothing of the app is loaded in gunicorn's master: each worker loads it, so a
reload (SIGHUP) forks workers that run the code and settings as they are then.
"""
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time

# A reload runs this file again in the master: first forget the project's
# modules the last run imported, so that this run and every worker forked after
# it read the code as it is now. (Only in gunicorn, which loads this file as
# "__config__": a process that merely reads the file keeps its modules.)
if __name__ == "__config__":
    for _name in [m for m in sys.modules if m in ("chatbot", "wsgi") or m.startswith("chatbot.")]:
        del sys.modules[_name]

# glibc's malloc gives every thread a cache of freed blocks (tcache) and up
# to eight arenas per core. With a thread per open stream that was most of a
# stream's memory: 240 KB per open stream with them, about 110 KB without
# (bench/README.md). Tunables are read when a process starts, so the master
# runs itself again, once, with them (workers inherit them), unless the
# operator set GLIBC_TUNABLES already. Other C libraries ignore the variable.
MALLOC_TUNABLES = "glibc.malloc.tcache_count=0:glibc.malloc.arena_max=2"
if __name__ == "__config__" and "GLIBC_TUNABLES" not in os.environ:
    os.environ["GLIBC_TUNABLES"] = MALLOC_TUNABLES
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])

from dotenv import dotenv_values  # noqa: E402

import chatbot  # noqa: E402
from chatbot import settings  # noqa: E402

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(chatbot.__file__)))
# wsgi.py loads .env in each worker; read it here too, without changing the
# master's environment (a value it set would outlive its removal from .env).
ENV = {**dotenv_values(os.path.join(PROJECT, ".env")), **os.environ}
try:
    SETTINGS = settings.load(ENV)
except settings.SettingsError as e:
    print(e, file=sys.stderr)  # one line, not a traceback
    sys.exit(1)
# As Flask's instance folder (create_app): instance/ beside the package.
DATABASE = ENV.get("CHATBOT_DATABASE") or os.path.join(PROJECT, "instance", "chatbot.sqlite")

bind = SETTINGS["BIND"]
worker_class = "gthread"
workers = SETTINGS["WORKERS"]
threads = SETTINGS["THREADS"]
# A worker takes few more connections than it has threads: the rest wait in the
# listen queue for a worker with a free thread, instead of starving in this one.
# The margin is for idle keep-alive connections (nginx keeps some open), which
# hold a connection slot but no thread; with none, gunicorn turns keep-alive off.
KEEPALIVE_MARGIN = 32
worker_connections = threads + KEEPALIVE_MARGIN
# With gthread, `timeout` is a heartbeat of each worker's main loop, not a limit
# on a request: a long stream is never cut by it.
timeout = math.ceil(SETTINGS["WORKER_TIMEOUT"])
graceful_timeout = math.ceil(SETTINGS["GRACEFUL_TIMEOUT"])
keepalive = 5
# No access log here: chatbot/requestlog.py logs each request as one JSON line,
# with the key name and session id, written when the response (a whole stream) is done.
accesslog = None
wsgi_app = "wsgi:app"

# gunicorn's control socket has one default path for every instance on the
# machine; we do not use it, and two instances would take it from each other.
control_socket_disable = True

# child_exit runs in the master's main loop: it waits this long at most for a
# database another process holds (a worker's replacement waits meanwhile).
CHILD_EXIT_BUSY_MS = 1000


def on_starting(server):
    """Once, in the master at start: a fresh directory where the workers'
    metrics meet (prometheus_client's multiprocess mode; chatbot/metrics.py)."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        # Counts of an earlier run would add up with this one's.
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory)
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = server.metrics_directory = tempfile.mkdtemp(prefix="chatbot-metrics-")


def on_exit(server):
    if getattr(server, "metrics_directory", None):
        shutil.rmtree(server.metrics_directory, ignore_errors=True)


def child_exit(server, worker):
    """A worker died (or was killed): drop its live gauges, and release the
    sessions it was replying in, so they accept a new chat at once, keeping the
    text it had stored.

    Never raises: an exception here stops gunicorn's master, and with it the
    server. What this cannot do, the lease's expiry does later."""
    try:
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(worker.pid)
    except Exception:
        server.log.exception("child_exit: could not drop the metrics of worker %s", worker.pid)
    try:
        from chatbot import db, store
        conn = db.connect(DATABASE, busy_timeout_ms=CHILD_EXIT_BUSY_MS)
        try:
            # The lease is the truth (a lease that expires frees the session anyway);
            # the master knows this worker is dead, so it frees its sessions at once.
            store.recover_dead_generations(conn, lease_owner_prefix=f"{socket.gethostname()}:{worker.pid}:")
        finally:
            conn.close()
    except Exception:
        server.log.exception("child_exit: could not release the replies of worker %s (they are released "
                             "when their lease expires)", worker.pid)


def post_worker_init(worker):
    # gunicorn's options (--threads, GUNICORN_CMD_ARGS) may differ from this
    # file's values: size everything from the ones in force.
    worker.worker_connections = worker.cfg.threads + KEEPALIVE_MARGIN
    worker.max_keepalived = KEEPALIVE_MARGIN
    start_all_threads(worker)
    end_answers_before_graceful_timeout(worker)


def start_all_threads(worker):
    """Start every thread of the worker's pool now.

    ThreadPoolExecutor starts threads lazily and counts a thread idle again after
    each task it finishes, so after a burst of short requests it believes it has
    idle threads it does not have: new requests then queue behind running
    streams (a stream would wait for another to end) although the pool is far
    from its size. With every thread started, a free thread always takes the
    next request.
    """
    barrier = threading.Barrier(worker.cfg.threads + 1)
    for _ in range(worker.cfg.threads):
        worker.tpool.submit(barrier.wait)
    barrier.wait(timeout=30)


def end_answers_before_graceful_timeout(worker):
    """On a graceful stop (SIGTERM, or SIGHUP to the master), answers still
    running shortly before the graceful timeout are ended by us, stored as
    incomplete and closed with a `done` event, before gunicorn kills the worker."""
    from chatbot.generation import SHUTDOWN

    gunicorn_handler = signal.getsignal(signal.SIGTERM)
    seconds = max(worker.cfg.graceful_timeout - 2, 0.5)

    def on_sigterm(signum, frame):
        timer = threading.Timer(seconds, SHUTDOWN.set)
        timer.daemon = True
        timer.start()
        gunicorn_handler(signum, frame)
        threading.Thread(target=close_listeners, args=(worker,), daemon=True).start()
    signal.signal(signal.SIGTERM, on_sigterm)
    signal.siginterrupt(signal.SIGTERM, False)


def close_listeners(worker):
    """On a graceful stop, stop accepting at once. gunicorn keeps each worker's
    copy of the listening socket open until the worker exits, so for up to the
    graceful timeout new connections wait in the kernel's backlog for nobody.
    Closed in every worker (the master closes its own on a stop, and keeps it
    on a reload), the port refuses them, and a proxy tries another server at
    once (nginx: proxy_next_upstream error)."""
    deadline = time.monotonic() + 5
    while getattr(worker, "_accepting", False):   # the worker's loop unregisters them first
        if time.monotonic() > deadline:
            return   # still in its poller: closing them under it is not safe
        time.sleep(0.05)
    for listener in worker.sockets:
        listener.close()
