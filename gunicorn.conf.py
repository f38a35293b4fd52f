"""gunicorn settings. Each open stream holds one thread for its whole length,
so workers x threads is the number of streams that can run at once."""
import os
import signal
import threading

bind = os.environ.get("CHATBOT_BIND", "127.0.0.1:5000")
worker_class = "gthread"
workers = int(os.environ.get("CHATBOT_WORKERS", "2"))
threads = int(os.environ.get("CHATBOT_THREADS", "256"))
# A worker takes few more connections than it has threads: the rest wait in the
# listen queue for a worker with a free thread, instead of starving in this one.
# The margin is for idle keep-alive connections (nginx keeps some open), which
# hold a connection slot but no thread; with none, gunicorn turns keep-alive off.
worker_connections = threads + 32
# With gthread, `timeout` is a heartbeat of each worker's main loop, not a limit
# on a request: a long stream is never cut by it.
timeout = int(os.environ.get("CHATBOT_WORKER_TIMEOUT", "30"))
graceful_timeout = int(os.environ.get("CHATBOT_GRACEFUL_TIMEOUT", "30"))
keepalive = 5
# No access log here: chatbot/access.py logs each request as one JSON line, with the
# key name and session id, written when the response (a whole stream) is done.
accesslog = None
wsgi_app = "wsgi:app"


# gunicorn's control socket has one default path for every instance on the
# machine; we do not use it, and two instances would take it from each other.
control_socket_disable = True


def when_ready(server):
    """Load the app in the master once, so that child_exit has its settings at
    hand when a worker dies, instead of building the app then."""
    import wsgi  # noqa: F401


def child_exit(server, worker):
    """A worker died (or was killed): release the sessions it was replying in,
    so they accept a new chat at once, and keep the text it had stored."""
    import socket

    from chatbot import db, store
    from wsgi import app

    conn = db.connect(app.config["DATABASE"])
    try:
        # The lease is the truth (a lease that expires frees the session anyway);
        # the master knows this worker is dead, so it frees its sessions at once.
        store.recover_dead_generations(conn, lease_owner_prefix=f"{socket.gethostname()}:{worker.pid}:")
    finally:
        conn.close()


def post_worker_init(worker):
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
    barrier = threading.Barrier(threads + 1)
    for _ in range(threads):
        worker.tpool.submit(barrier.wait)
    barrier.wait(timeout=30)


def end_answers_before_graceful_timeout(worker):
    """On a graceful stop (SIGTERM, or SIGHUP to the master), answers still
    running shortly before the graceful timeout are ended by us, stored as
    incomplete and closed with a `done` event, before gunicorn kills the worker."""
    from chatbot.generation import SHUTDOWN

    gunicorn_handler = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        timer = threading.Timer(max(graceful_timeout - 2, 0.5), SHUTDOWN.set)
        timer.daemon = True
        timer.start()
        gunicorn_handler(signum, frame)
    signal.signal(signal.SIGTERM, on_sigterm)
    signal.siginterrupt(signal.SIGTERM, False)
