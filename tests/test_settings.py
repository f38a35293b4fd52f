"""Settings: one checked model made from DEFAULTS; a bad value stops the start
with one line naming its variable."""
import subprocess
import sys

import pytest

from chatbot import DEFAULTS, create_app, settings

from conftest import ROOT


@pytest.mark.parametrize("name, value, says", [
    ("LLM_IDLE_TIMEOUT", "abc", "valid number"),
    ("LLM_FIRST_TOKEN_TIMEOUT", "0", "greater than 0"),
    ("LLM_PROTOCOL", "grpc", "'midm' or 'openai'"),
    ("AUTH", "maybe", "'required' or 'disabled'"),
    ("MAX_MESSAGE_CHARS", "-1", "greater than or equal to 0"),
    ("MAX_MESSAGE_CHARS", "2.5", "integer"),
    ("LOG_CONTENT", "perhaps", "boolean"),
    ("THREADS", "0", "greater than or equal to 1"),
])
def test_a_bad_setting_in_the_environment_stops_create_app_naming_it(monkeypatch, tmp_path, name, value, says):
    monkeypatch.setenv(f"CHATBOT_{name}", value)
    with pytest.raises(settings.SettingsError) as raised:
        create_app({"DATABASE": str(tmp_path / "db.sqlite")})
    message = str(raised.value)
    assert f"CHATBOT_{name}=" in message and says in message and "\n" not in message


def test_settings_from_the_environment_are_converted(monkeypatch, make_app):
    monkeypatch.setenv("CHATBOT_LLM_IDLE_TIMEOUT", "0.5")
    monkeypatch.setenv("CHATBOT_MAX_MESSAGE_CHARS", "100")
    monkeypatch.setenv("CHATBOT_LOG_CONTENT", "true")
    monkeypatch.setenv("CHATBOT_LLM_API_KEY", "12345")   # text, though it reads as a number
    config = make_app().config
    assert config["LLM_IDLE_TIMEOUT"] == 0.5 and config["MAX_MESSAGE_CHARS"] == 100
    assert config["LOG_CONTENT"] is True and config["LLM_API_KEY"] == "12345"


def test_a_bad_test_config_is_refused_too(make_app):
    with pytest.raises(settings.SettingsError, match="CHATBOT_HEALTH_TIMEOUT"):
        make_app(HEALTH_TIMEOUT=-1)


def test_every_default_passes_its_own_check():
    assert settings.check(DEFAULTS).keys() == DEFAULTS.keys()


def test_a_secret_is_never_shown_in_the_message():
    with pytest.raises(settings.SettingsError) as raised:
        settings.check({**DEFAULTS, "METRICS_TOKEN": ["s3cret-token"]})
    assert "s3cret" not in str(raised.value) and "CHATBOT_METRICS_TOKEN" in str(raised.value)


def test_gunicorn_refuses_to_start_with_one_line_naming_the_bad_setting(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "CHATBOT_LLM_IDLE_TIMEOUT": "abc",
           "CHATBOT_DATABASE": str(tmp_path / "db.sqlite"), "CHATBOT_BIND": "127.0.0.1:0"}
    done = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("Invalid setting: CHATBOT_LLM_IDLE_TIMEOUT='abc'")
    assert "Traceback" not in done.stderr


def test_the_flask_cli_says_it_in_one_line_too(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "CHATBOT_LLM_PROTOCOL": "grpc", "CHATBOT_DATABASE": str(tmp_path / "db.sqlite")}
    done = subprocess.run([sys.executable, "-m", "flask", "--app", "chatbot", "init-db"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("Error: Invalid setting: CHATBOT_LLM_PROTOCOL='grpc'")
