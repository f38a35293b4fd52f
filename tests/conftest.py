"""Fixtures: an app on its own database, and real server processes on loopback
(the project's stand-in LLM, and gunicorn running the service) for the tests
whose behaviour is about HTTP streaming.

Every test that uses a database through these fixtures runs twice: on SQLite
and on PostgreSQL (a server of its own, started once per test run; each test
gets a schema of its own in it). Mark a test `sqlite_only` when it is about
SQLite itself. Without PostgreSQL installed the PostgreSQL runs skip, saying
why, except under CI=true, where they fail."""
import glob
import http.client
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from chatbot import access, create_app, db

ROOT = Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            requests.get(url, timeout=5)
            return
        except requests.RequestException:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def stop_process(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Process:
    def __init__(self, args, url, health_path, env=None, cwd=ROOT):
        self.url = url
        env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
        # stderr goes to a file, not a pipe: a pipe nobody reads fills up (64 KiB of
        # log lines) and then blocks the server.
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=self.stderr)
        wait_until_up(url + health_path, self.proc)

    def output(self):
        """Everything the process wrote to stderr so far."""
        self.stderr.seek(0)
        return self.stderr.read().decode("utf-8", "replace")

    def stop(self):
        stop_process(self.proc)


def start_standin(delay=0.01):
    port = free_port()
    return Process([sys.executable, "-m", "chatbot.standin", "--port", str(port), "--delay", str(delay)],
                   f"http://127.0.0.1:{port}", "/health")


@pytest.fixture(scope="session")
def standin():
    """The stand-in LLM server (a real process on loopback), shared by the session."""
    server = start_standin()
    yield server.url
    server.stop()


@pytest.fixture
def standin_log(standin):
    """The stand-in's log of the requests it received (cleared for each test)."""
    requests.delete(standin + "/_standin/requests")

    def read():
        return requests.get(standin + "/_standin/requests").json()["requests"]
    return read


# --- the database engines ------------------------------------------------------

ENGINES = ("sqlite", "postgresql")


def pytest_configure(config):
    config.addinivalue_line("markers", "sqlite_only: a test about SQLite itself (not run on PostgreSQL)")


def pytest_generate_tests(metafunc):
    if "engine" in metafunc.fixturenames:
        engines = ENGINES[:1] if metafunc.definition.get_closest_marker("sqlite_only") else ENGINES
        metafunc.parametrize("engine", engines, indirect=True, scope="module")


def postgres_bin():
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    """A PostgreSQL server of the test run's own: a temporary directory, a free
    port on loopback only, the unix socket in the directory, no fsync (the
    data is thrown away). initdb refuses root, so as root it runs as `postgres`."""

    def __init__(self, bindir):
        self.bindir = bindir
        self.dir = tempfile.mkdtemp(prefix="chatbot-pg-")
        self.as_user = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.data = os.path.join(self.dir, "data")
        self.port = free_port()
        self.run("initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-locale",
                 "--no-sync")
        options = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c max_connections=400"
                   " -c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        self.run("pg_ctl", "-D", self.data, "-l", os.path.join(self.dir, "log"), "-o", options, "-w", "start")
        self.admin_url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        try:
            conn = db.connect(self.admin_url)
            conn.execute("CREATE DATABASE chatbot_test")
            conn.close()
        except BaseException:   # never leave a server behind
            self.stop()
            raise

    def run(self, program, *args):
        done = subprocess.run([*self.as_user, str(self.bindir / program), *args], cwd=self.dir,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"{program} failed ({done.returncode}): {done.stderr.strip()}")

    def new_database(self):
        """The URL of a new, empty database: a schema of its own, named by search_path."""
        schema = "t_" + uuid.uuid4().hex[:16]
        conn = db.connect(self.url())
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.close()
        return self.url(schema)

    def url(self, schema=None):
        options = f"?options=-c%20search_path%3D{schema}" if schema else ""
        return f"postgresql://postgres@127.0.0.1:{self.port}/chatbot_test{options}"

    def stop(self):
        subprocess.run([*self.as_user, str(self.bindir / "pg_ctl"), "-D", self.data, "-m", "immediate", "stop"],
                       cwd=self.dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    """The PostgreSQL server of this test run (skipped without PostgreSQL, except under CI)."""
    bindir = postgres_bin()
    if bindir is None:
        reason = ("PostgreSQL is not installed (no initdb in /usr/lib/postgresql/*/bin or on PATH): "
                  "`apt-get install postgresql` runs these tests")
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI=true: never skipped)")
        pytest.skip(reason)
    server = PostgresServer(bindir)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def engine(request):
    """The database engine of a test: "sqlite" or "postgresql" (see pytest_generate_tests)."""
    if request.param == "postgresql":
        request.getfixturevalue("postgres")
    return request.param


@pytest.fixture(scope="module")
def new_database(engine, request, tmp_path_factory):
    """new_database() -> a new, empty database on the test's engine: a SQLite
    file path, or a PostgreSQL URL."""
    def make():
        if engine == "sqlite":
            return str(tmp_path_factory.mktemp("db") / "test.sqlite")
        return request.getfixturevalue("postgres").new_database()
    return make


@pytest.fixture
def database(new_database, engine):
    """This test's database (a SQLite path or a PostgreSQL URL)."""
    database = new_database()
    yield database
    if engine == "postgresql":   # this process's connections to it, at once (not at the module's end)
        from chatbot import pg
        pg.close_pools(database)


@pytest.fixture
def make_app(database, standin):
    """make_app(**config) -> an app on this test's database. API keys are off
    unless a test turns them on (AUTH="required"): see tests/test_access.py."""
    def make(**config):
        return create_app({"TESTING": True, "DATABASE": database, "LLM_URL": standin,
                           "AUTH": "disabled", **config})
    return make


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def fake_llm(app):
    """The app's LLM server replaced by one in this process (tests/fake_llm.py):
    instant answers, queued by the test. For tests not about HTTP streaming."""
    from fake_llm import FakeLLM
    app.extensions["upstream"] = fake = FakeLLM()
    return fake


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def session_id(client):
    return client.post("/api/sessions").json["session_id"]


class Gunicorn(Process):
    def __init__(self, db_path, env, config="gunicorn.conf.py", cwd=ROOT):
        port = free_port()
        self.db_path = db_path
        self.bind = f"127.0.0.1:{port}"
        env = {"CHATBOT_BIND": self.bind, "CHATBOT_DATABASE": str(db_path), **env}
        super().__init__([sys.executable, "-m", "gunicorn", "-c", str(config)],
                         f"http://127.0.0.1:{port}", "/api/health", env, cwd)

    def new_session(self, headers=None):
        return requests.post(self.url + "/api/sessions", headers=headers).json()["session_id"]

    def new_key(self, name):
        """Authorization headers with a new API key for `name` (for CHATBOT_AUTH=required)."""
        return bearer(new_api_key(self.db_path, name))

    def get(self, path, headers=None):
        return requests.get(self.url + path, headers=headers).json()

    def stop(self):
        # Tests need no graceful shutdown: SIGINT is gunicorn's quick one.
        workers = self.worker_pids()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        super().stop()
        # A worker whose thread is stuck in a request (a WebSocket, say) does not
        # exit, and outlives a master killed after the wait: end it too.
        for pid in workers:
            if self.is_ours(pid):
                os.kill(pid, signal.SIGKILL)

    def worker_pids(self):
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                return [int(pid) for pid in f.read().split()]
        except OSError:
            return []

    def is_ours(self, pid):
        """Still a process of this server (not a pid reused meanwhile)."""
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                return f"CHATBOT_BIND={self.bind}".encode() in f.read().split(b"\0")
        except OSError:
            return False


def new_api_key(db_path, name):
    """A new API key for `name`, made by the service's own code in its database."""
    conn = db.connect(str(db_path))
    try:
        return access.create_key(conn, name)
    finally:
        conn.close()


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def gunicorn_env(standin, env):
    """The fixtures' settings of a gunicorn process; API keys are off unless env says otherwise."""
    return {"CHATBOT_LLM_URL": standin, "CHATBOT_WORKERS": "2", "CHATBOT_THREADS": "16",
            "CHATBOT_AUTH": "disabled", **env}


@pytest.fixture
def start_server(new_database, standin):
    """start_server(db_path=None, config="gunicorn.conf.py", cwd=ROOT, **env) -> a
    gunicorn process running the service (stopped at teardown), on a new
    database of the test's engine. Two servers given one db_path (a server's
    .db_path) share a database, as the worker processes of one server do.

    env values are CHATBOT_* settings, e.g. start_server(CHATBOT_WORKERS="1");
    None removes a setting (start_server(CHATBOT_THREADS=None): gunicorn.conf.py's default).
    API keys are off unless a test passes CHATBOT_AUTH="required".
    """
    servers = []

    def start(db_path=None, config="gunicorn.conf.py", cwd=ROOT, **env):
        servers.append(Gunicorn(db_path or new_database(), gunicorn_env(standin, env), config, cwd))
        return servers[-1]
    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def live_server_env():
    """CHATBOT_* settings of live_server; a test module may override this fixture."""
    return {}


@pytest.fixture(scope="module")
def live_server(new_database, standin, live_server_env):
    """One gunicorn process shared by the tests of a module; each test makes its own sessions."""
    server = Gunicorn(new_database(), gunicorn_env(standin, live_server_env))
    yield server
    server.stop()


@pytest.fixture
def server(start_server):
    return start_server()


class SSEStream:
    """A streaming POST read the way a client reads it: raw bytes off the socket
    as they arrive, split into events. Each event is (name, data, arrival time)."""

    def __init__(self, base_url, path, body=None, headers=None):
        """POST `body` as JSON, or GET `path` (a re-attach) when there is no body."""
        parts = urlsplit(base_url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        if body is None:
            self.conn.request("GET", path, headers=headers or {})
        else:
            self.conn.request("POST", path, body=json.dumps(body).encode(),
                              headers={"Content-Type": "application/json", **(headers or {})})
        self.sock = self.conn.sock  # getresponse() drops it when the answer will close the connection
        self.response = self.conn.getresponse()
        self.status = self.response.status
        self.headers = self.response.headers
        self.raw = b""        # every byte of the body, as received
        self.cut = False      # whether the body broke off (no final chunk)
        self.ids = []         # the `id:` of each event (None without one), in order
        self.done_marker = False  # whether `data: [DONE]` came
        self._buffer = b""

    def events(self):
        while True:
            while b"\n\n" not in self._buffer:
                try:
                    data = self.response.read1(65536)
                except http.client.IncompleteRead:  # the server's end broke off mid-body
                    self.cut = True
                    return
                if not data:
                    return
                self.raw += data
                self._buffer += data
            block, self._buffer = self._buffer.split(b"\n\n", 1)
            if block == b"data: [DONE]":  # for clients of the original backend; ours skip it
                self.done_marker = True
                continue
            fields = dict(line.split(": ", 1) for line in block.decode().split("\n") if not line.startswith(":"))
            if "event" in fields:
                self.ids.append(int(fields["id"]) if "id" in fields else None)
                yield fields["event"], json.loads(fields["data"]), time.monotonic()
            else:
                yield "comment", block.decode(), time.monotonic()

    def close(self):
        """Leave the way a client that goes away does: the connection closes."""
        self.sock.shutdown(socket.SHUT_RDWR)
        self.response.close()
        self.conn.close()


def wait_for(predicate, timeout=5, interval=0.05):
    """Poll until predicate() is truthy; return its value (or the last one)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


@pytest.fixture
def silent_listener():
    """silent_listener(hang_connect=False) -> the URL of a TCP port that never answers.

    The kernel completes connections into the listen backlog, so a request is
    sent and then waits forever for an answer (a hung LLM server). With
    hang_connect=True the backlog is already full, so connecting itself hangs.
    """
    sockets = []

    def make(hang_connect=False):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(0 if hang_connect else 16)
        sockets.append(listener)
        if hang_connect:
            filler = socket.create_connection(listener.getsockname())
            sockets.append(filler)
        return "http://127.0.0.1:%d" % listener.getsockname()[1]
    yield make
    for s in sockets:
        s.close()
