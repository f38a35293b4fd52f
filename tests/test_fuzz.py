"""Fuzzing: schemathesis generates requests from GET /api/openapi.json and sends
them to a live server (gunicorn + the stand-in LLM, keys required).

It fails on any 5xx, on any answer whose status, content type, headers or body
does not match the description (every error must be application/problem+json
with the Problem schema), on schema-valid requests that are refused and
schema-invalid ones that are accepted, on a missing 401 without a key, on a
deleted session that is still there, and on one key reading another's session
(two keys, alice and bob, are "peers": what alice reads is replayed as bob).
The stream's events are checked one by one against their schemas too
(schemathesis reads Server-Sent Events). What CONFIG leaves out, and why, is
written there: the WebSocket is only seen as a plain GET (tests/test_ws_live.py
covers it), a made-up list cursor is rightly refused, and an OPTIONS on
/api/sessions/import lists the methods of /api/sessions/{session_id} as well.

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

# A plain GET of the WebSocket is a 400: nothing valid can be sent to it over HTTP.
[[operations]]
include-operation-id = "ws.chat_ws"
checks.positive_data_acceptance.enabled = false

# A cursor is opaque: one made up, however well formed, is a 400 invalid_cursor.
[[operations]]
include-operation-id = "sessions.list_sessions"
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "429", "5xx"]

# The OpenAI-compatible paths answer in OpenAI's shapes and take OpenAI's loose
# request (unknown fields ignored, some refused by value): the official openai
# package drives them in tests/test_openai_api_live.py.
[[operations]]
include-path-regex = "^/v1/"
enabled = false

# /api/sessions/import is also /api/sessions/<session_id> to the router, so an
# OPTIONS there names GET, PATCH and DELETE too (they answer session_not_found).
[[operations]]
include-operation-id = "sessions.import_"
checks.allow_header_conformance.enabled = false
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
    # The server's tracebacks (its log holds no keys) say what a 500 was.
    errors = "\n".join(line for line in server.output().splitlines() if not line.startswith("{"))
    assert run.returncode == 0, output[-20000:] + "\n--- server log, less request lines ---\n" + errors[-10000:]

    result = json.loads(report.read_text())
    generated = result["test_cases"]["generated"]
    print(f"schemathesis: {generated} test cases on {result['operations']['tested']} operations, seed {SEED}")
    assert generated >= 100, output[-5000:]   # a run that generated next to nothing proves nothing
    described = {f"{method.upper()} {path}" for path, item in server.get("/api/openapi.json")["paths"].items()
                 for method in item}
    # Every operation was fuzzed, but the description itself (schemathesis leaves out its own source).
    assert set(result["valid_rates"]) == {op for op in described - {"GET /api/openapi.json"} if " /v1/" not in op}
