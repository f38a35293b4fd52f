"""The project's shape (design card) and the gunicorn settings it is served with."""
import re
import runpy

import pytest

from chatbot import create_app
from conftest import ROOT, SSEStream
from helpers import rows

PINNED = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?==[A-Za-z0-9.+!-]+$")


@pytest.mark.parametrize("path", ["wsgi.py", "chatbot/__init__.py", "schema.sql", "requirements.txt",
                                  "requirements-dev.txt", "gunicorn.conf.py", "tests/conftest.py", "README.md"])
def test_the_top_level_files_exist(path):
    assert (ROOT / path).is_file()


@pytest.mark.parametrize("name", ["requirements.txt", "requirements-dev.txt"])
def test_every_requirement_is_pinned(name):
    lines = [line.split("#")[0].strip() for line in (ROOT / name).read_text().splitlines()]
    requirements = [line for line in lines if line and not line.startswith("-r ")]
    assert requirements and all(PINNED.match(r) for r in requirements), requirements


def test_the_app_factory_takes_a_test_config_and_registers_the_blueprints(tmp_path, standin):
    app = create_app({"DATABASE": str(tmp_path / "x.sqlite"), "LLM_URL": standin, "SYSTEM_PROMPT": "p"})
    assert app.config["SYSTEM_PROMPT"] == "p" and app.config["DATABASE"] == str(tmp_path / "x.sqlite")
    assert {"sessions", "chat", "health"} <= set(app.blueprints)


def test_settings_come_from_chatbot_environment_variables(tmp_path, standin, monkeypatch):
    monkeypatch.setenv("CHATBOT_CONTEXT_MAX_TOKENS", "1234")
    monkeypatch.setenv("CHATBOT_SYSTEM_PROMPT", "환경")
    app = create_app({"DATABASE": str(tmp_path / "x.sqlite")})
    assert app.config["CONTEXT_MAX_TOKENS"] == 1234 and app.config["SYSTEM_PROMPT"] == "환경"


def gunicorn_settings(monkeypatch, **env):
    for name in ("CHATBOT_WORKERS", "CHATBOT_THREADS", "CHATBOT_WORKER_TIMEOUT", "CHATBOT_BIND"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return runpy.run_path(str(ROOT / "gunicorn.conf.py"))


def test_gunicorn_runs_threaded_workers_sized_from_the_environment(monkeypatch):
    defaults = gunicorn_settings(monkeypatch)
    assert defaults["worker_class"] == "gthread" and defaults["wsgi_app"] == "wsgi:app"
    assert defaults["workers"] >= 1 and defaults["threads"] >= 16  # each stream holds a thread
    assert defaults["timeout"] >= 30
    custom = gunicorn_settings(monkeypatch, CHATBOT_WORKERS="3", CHATBOT_THREADS="7",
                               CHATBOT_WORKER_TIMEOUT="9", CHATBOT_BIND="127.0.0.1:9999")
    assert (custom["workers"], custom["threads"], custom["timeout"], custom["bind"]) == (3, 7, 9, "127.0.0.1:9999")


def test_a_stream_longer_than_the_worker_timeout_is_not_cut(start_server):
    # One thread: gunicorn would quietly turn a "sync" worker_class with threads into gthread.
    server = start_server(CHATBOT_WORKER_TIMEOUT="2", CHATBOT_WORKERS="1", CHATBOT_THREADS="1")
    workers = server.worker_pids()
    sid = server.new_session()
    s = SSEStream(server.url, "/api/chat/stream", {"session_id": sid, "message": "@@words=14 @@delay=0.25"})
    events = list(s.events())  # about 3.5 s, well over the timeout
    assert not s.cut and events[-1][0] == "done" and events[-1][1]["content"].endswith("단어14 ")
    assert server.worker_pids() == workers  # the worker was never killed and replaced
    assert rows(server.db_path, "SELECT status FROM messages WHERE role = 'assistant'") == [{"status": "complete"}]
