#!/usr/bin/env bash
# Start the service: the database, an LLM server when none is configured, gunicorn.
set -euo pipefail
cd "$(dirname "$0")/.."

flask --app chatbot init-db

if [ -z "${CHATBOT_LLM_URL:-}" ]; then
    port=${CHATBOT_STANDIN_PORT:-8000}
    echo ">>> No CHATBOT_LLM_URL set: starting the STAND-IN LLM server (not a real model) on port $port"
    python -m chatbot.standin --port "$port" &
    standin_pid=$!
    trap 'kill $standin_pid 2>/dev/null' EXIT
    export CHATBOT_LLM_URL="http://127.0.0.1:$port" CHATBOT_LLM_PROTOCOL=midm
fi

echo ">>> Chatbot backend on http://${CHATBOT_BIND:-127.0.0.1:5000} (LLM: $CHATBOT_LLM_URL)"
gunicorn -c gunicorn.conf.py
