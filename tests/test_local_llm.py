"""How the local model is started, and when its tests may be skipped."""
import importlib.util

import pytest

from chatbot import local_llm
from test_real_llm import require_llama


def test_the_server_queues_requests_and_keeps_no_logits_by_default(monkeypatch, tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"")
    monkeypatch.setattr(local_llm, "model_path", lambda: tmp_path / "model.gguf")
    argv = local_llm.command(8080, threads=3)
    flags = dict(zip(argv[3::2], argv[4::2]))
    assert argv[1:3] == ["-m", "llama_cpp.server"]
    assert flags["--model"] == str(tmp_path / "model.gguf") and flags["--model_alias"] == "smollm2"
    assert flags["--host"] == "127.0.0.1" and flags["--port"] == "8080"
    assert flags["--n_threads"] == flags["--n_threads_batch"] == "3"
    assert flags["--interrupt_requests"] == "False" and flags["--logits_all"] == "False"
    assert flags["--n_ctx"] == "8192"
    assert local_llm.environ()["OMP_WAIT_POLICY"] == "PASSIVE"


def test_a_missing_model_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert local_llm.installed() is False
    with pytest.raises(LookupError, match="install-real-llm.sh"):
        local_llm.model_path()


def test_without_llama_the_real_llm_tests_skip_on_a_workstation(monkeypatch):
    monkeypatch.setattr(local_llm, "installed", lambda: False)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_llama()


def test_without_llama_the_real_llm_tests_fail_in_ci(monkeypatch):
    monkeypatch.setattr(local_llm, "installed", lambda: False)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="install-real-llm.sh"):
        require_llama()
