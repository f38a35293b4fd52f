"""Fuzzing: schemathesis generates requests from GET /api/openapi.json and sends
them to a live server (gunicorn + the stand-in LLM, keys required).

It fails on any 5xx, on any answer whose status, content type, headers or body
does not match the description (every error must be application/problem+json
with the Problem schema), on schema-valid requests that are refused and
schema-invalid ones that are accepted, on a missing 401 without a key, on a
deleted session that is still there, and on one key reading another's session
(two keys, alice and bob, are "peers": what alice reads is replayed as bob).
The stream's events are checked one by one against their schemas too
(schemathesis reads Server-Sent Events). The WebSocket is only seen as a plain
GET (a 400 without the upgrade, or a 401), so "a valid request is accepted" is
not checked for it; tests/test_ws_live.py covers it.

Bounded so it takes a minute or two; FUZZ_EXAMPLES and FUZZ_SEED change the
budget and the (fixed, so CI is repeatable) seed. Run with -rP to see the count.
"""
import json
import os
import subprocess
import sys

EXAMPLES = os.environ.get("FUZZ_EXAMPLES", "25")
SEED = os.environ.get("FUZZ_SEED", "20261127")


CONFIG = """
[auth.wfc]
path = "auth.json"
peers = ["alice", "bob"]

[[operations]]
include-operation-id = "ws.chat_ws"
checks.positive_data_acceptance.enabled = false
"""


def test_schemathesis_finds_nothing(start_server, tmp_path):
    # A rate limit far above what the fuzzer sends: the counter still runs on every request.
    server = start_server(CHATBOT_AUTH="required", CHATBOT_RATE_LIMIT_PER_MINUTE="1000000")
    users = [{"name": name, "fixedHeaders": [{"name": "Authorization", "value": server.new_key(name)["Authorization"]}]}
             for name in ("alice", "bob")]
    (tmp_path / "auth.json").write_text(json.dumps({"auth": users}))
    (tmp_path / "schemathesis.toml").write_text(CONFIG)
    report = tmp_path / "report.json"
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", "schemathesis.toml", "run",
         server.url + "/api/openapi.json",  # every check is on by default
         "--max-examples", EXAMPLES, "--seed", SEED, "--request-timeout", "30",
         "--report", "json", "--report-json-path", str(report)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "120"})
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-20000:]

    result = json.loads(report.read_text())
    generated = result["test_cases"]["generated"]
    print(f"schemathesis: {generated} test cases on {result['operations']['tested']} operations, seed {SEED}")
    assert generated >= 100, output[-5000:]   # a run that generated next to nothing proves nothing
    described = {f"{method.upper()} {path}" for path, item in server.get("/api/openapi.json")["paths"].items()
                 for method in item}
    # Every operation was fuzzed, but the description itself (schemathesis leaves out its own source).
    assert set(result["valid_rates"]) == described - {"GET /api/openapi.json"}
