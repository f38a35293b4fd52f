#!/usr/bin/env bash
# Start the service, first run included: the venv, the packages, the database,
# an LLM server unless one is configured, and gunicorn. Ctrl-C stops it all.
#
#   scripts/run.sh                         a real local model: llama.cpp serving SmolLM2-135M
#                                          (compiled once: 7-10 minutes on 2 cores)
#   scripts/run.sh --standin               the stand-in LLM (not a model): starts at once
#                                          (same as CHATBOT_LLM=standin)
#   CHATBOT_LLM_URL=http://... scripts/run.sh   your own LLM server (also read from .env);
#                                          nothing else is started
#
# LOCAL_LLM_PORT (8080) and CHATBOT_STANDIN_PORT (8000) choose the LLM's port;
# LOCAL_LLM_THREADS the local model's CPU threads (default: half the cores).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo ">>> $*"; }

llm=${CHATBOT_LLM:-local}
case "${1:-}" in
    --standin) llm=standin ;;
    "") ;;
    *) echo "usage: $0 [--standin]" >&2; exit 2 ;;
esac
if [ -n "${CHATBOT_LLM_URL:-}" ] || grep -qs '^CHATBOT_LLM_URL=' .env; then
    llm=configured
fi
case "$llm" in local|standin|configured) ;; *) echo "CHATBOT_LLM must be 'local' or 'standin'" >&2; exit 2 ;; esac

# The virtual environment, and the backend's packages when requirements.txt changed.
if [ ! -x .venv/bin/python ]; then
    say "Creating the virtual environment .venv"
    "${PYTHON:-python3}" -m venv .venv
fi
if [ ! -e .venv/.requirements.txt ] || ! cmp -s requirements.txt .venv/.requirements.txt; then
    say "Installing the backend's packages (requirements.txt) into .venv"
    .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
    cp requirements.txt .venv/.requirements.txt
fi
bin=$PWD/.venv/bin
mkdir -p instance

llm_pid=
stop_llm() {
    if [ -n "$llm_pid" ] && kill -0 "$llm_pid" 2>/dev/null; then
        say "Stopping the LLM server (pid $llm_pid)"
        kill -TERM "$llm_pid" 2>/dev/null || true
        wait "$llm_pid" 2>/dev/null || true
    fi
}
trap stop_llm EXIT
trap 'exit 130' INT TERM   # so that the EXIT trap runs when interrupted early

# wait_for_llm URL LOG: until the LLM server answers, or give up showing its log.
wait_for_llm() {
    if ! "$bin/python" - "$1" "$llm_pid" <<'EOF'
import os, sys, time, urllib.request
url, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    try:
        urllib.request.urlopen(url, timeout=2)
        sys.exit(0)
    except OSError:
        try:
            os.kill(pid, 0)           # still starting?
        except OSError:
            sys.exit(1)
        time.sleep(0.25)
sys.exit(1)
EOF
    then
        say "The LLM server did not start; the end of $2:" >&2
        tail -n 20 "$2" >&2
        exit 1
    fi
}

case "$llm" in
local)
    if ! "$bin/python" -c 'import chatbot.local_llm as m, sys; sys.exit(not m.installed())'; then
        scripts/install-real-llm.sh "$bin/python"
    fi
    port=${LOCAL_LLM_PORT:-8080}
    log=instance/local-llm.log
    say "Starting the local model (llama.cpp, SmolLM2-135M-Instruct: small, English only) on port $port; its log: $log"
    "$bin/python" -m chatbot.local_llm --port "$port" ${LOCAL_LLM_THREADS:+--threads "$LOCAL_LLM_THREADS"} >"$log" 2>&1 &
    llm_pid=$!
    wait_for_llm "http://127.0.0.1:$port/v1/models" "$log"
    export CHATBOT_LLM_URL="http://127.0.0.1:$port" CHATBOT_LLM_PROTOCOL=openai
    export CHATBOT_LLM_MODEL=${CHATBOT_LLM_MODEL:-smollm2}
    ;;
standin)
    port=${CHATBOT_STANDIN_PORT:-8000}
    log=instance/standin-llm.log
    say "Starting the STAND-IN LLM server (not a real model) on port $port; its log: $log"
    "$bin/python" -m chatbot.standin --port "$port" >"$log" 2>&1 &
    llm_pid=$!
    wait_for_llm "http://127.0.0.1:$port/health" "$log"
    export CHATBOT_LLM_URL="http://127.0.0.1:$port" CHATBOT_LLM_PROTOCOL=midm
    ;;
configured)
    say "Using the configured LLM server ${CHATBOT_LLM_URL:-(from .env)}"
    ;;
esac

say "Preparing the database"
page_key=
"$bin/flask" --app chatbot init-db

# An API key for the README's examples: made once, kept in instance/local-api-key
# (readable by you only; the service stores only a hash of it). Made anew when
# the file is missing, so the file always holds the working key of 'local'.
key_file=instance/local-api-key
if [ "${CHATBOT_AUTH:-}" = disabled ] || { [ -z "${CHATBOT_AUTH:-}" ] && grep -qs '^CHATBOT_AUTH=disabled' .env; }; then
    say "CHATBOT_AUTH=disabled: NO API KEYS ARE CHECKED; anyone who can reach the service reads every conversation"
else
    if [ -s "$key_file" ]; then
        key=$("$bin/flask" --app chatbot create-api-key local --if-missing)
    else
        key=$("$bin/flask" --app chatbot create-api-key local --replace)
    fi
    if [ -n "$key" ]; then (umask 077; printf '%s\n' "$key" > "$key_file"); fi
    page_key=$(cat "$key_file")
    say "API key 'local' in $key_file: send it as -H \"Authorization: Bearer \$(cat $key_file)\""
fi
if [ "${CHATBOT_WEB_UI:-true}" != false ]; then
    say "Chat page: http://${CHATBOT_BIND:-127.0.0.1:5000}/${page_key:+ (paste the key $page_key)}"
fi

say "Chatbot backend on http://${CHATBOT_BIND:-127.0.0.1:5000} (LLM: ${CHATBOT_LLM_URL:-see .env}). Ctrl-C stops everything."
# gunicorn runs in the background so that this script can pass a stop signal on
# and then stop the LLM server (the EXIT trap) once gunicorn has finished.
"$bin/gunicorn" -c gunicorn.conf.py &
gunicorn_pid=$!
trap 'kill -TERM "$gunicorn_pid" 2>/dev/null || true' INT TERM
status=0
wait "$gunicorn_pid" || status=$?
while kill -0 "$gunicorn_pid" 2>/dev/null; do   # a signal ended `wait`: let gunicorn finish
    wait "$gunicorn_pid" || status=$?
done
exit "$status"
