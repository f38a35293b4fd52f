"""What the backend adds on top of a real model.

Starts llama.cpp serving SmolLM2-135M (chatbot/local_llm.py; needs
scripts/install-real-llm.sh) and gunicorn running the service against it, then
asks the same question in turns, straight to llama.cpp and through the
backend's /api/chat/stream, and compares:

- time to first token: from sending the request to the first piece of text;
  the backend's added time is the median of the paired differences;
- CPU per token: CPU seconds used by the backend's processes (gunicorn master
  and workers, from /proc) and by llama.cpp, divided by the pieces streamed.

    python bench/real_llm_bench.py [--rounds 10] [--max-tokens 128] [--threads 1]

Results are printed and written to bench/results/ as JSON.
"""
import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from chatbot import DEFAULTS, local_llm  # noqa: E402
from conftest import free_port, stop_process, wait_until_up  # noqa: E402

QUESTION = "Write a very long story about a dragon."  # at temperature 0 it runs to max_tokens
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """CPU time used so far by a process and its children that are still running."""
    total = 0.0
    for p in [pid, *children(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime
    return total


def children(pid):
    try:
        return [int(c) for t in os.listdir(f"/proc/{pid}/task")
                for c in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
    except OSError:
        return []


def stream(port, path, body, is_text):
    """POST, read the SSE answer as it arrives; (seconds to first text, pieces, seconds in all)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    started = time.perf_counter()
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    first, pieces, buffer = None, 0, b""
    while chunk := response.read1(65536):
        buffer += chunk
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            if is_text(event):
                pieces += 1
                first = first or time.perf_counter() - started
    conn.close()
    return first, pieces, time.perf_counter() - started


def direct_text(event):
    data = event.decode().removeprefix("data: ")
    if data.startswith("{"):
        choices = json.loads(data)["choices"]
        return bool(choices and choices[0]["delta"].get("content"))
    return False


def backend_text(event):
    return event.startswith(b"id: ") and b"event: delta" in event


def session(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/api/sessions", "{}", {"Content-Type": "application/json"})
    return json.loads(conn.getresponse().read())["session_id"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp's CPU threads")
    args = parser.parse_args()
    if not local_llm.installed():
        sys.exit("llama-cpp-python is not installed: run scripts/install-real-llm.sh")

    work = Path(tempfile.mkdtemp(prefix="real-llm-bench-"))
    llama_port, backend_port = free_port(), free_port()
    with open(work / "llama.log", "wb") as log:
        llama = subprocess.Popen(local_llm.command(llama_port, threads=args.threads),
                                 env=local_llm.environ(), stdout=log, stderr=subprocess.STDOUT)
    env = {**os.environ, "CHATBOT_BIND": f"127.0.0.1:{backend_port}", "CHATBOT_DATABASE": str(work / "db.sqlite"),
           "CHATBOT_LLM_URL": f"http://127.0.0.1:{llama_port}", "CHATBOT_LLM_PROTOCOL": "openai",
           "CHATBOT_LLM_MODEL": local_llm.MODEL_ALIAS, "CHATBOT_WORKERS": "1", "CHATBOT_AUTH": "disabled"}
    with open(work / "gunicorn.log", "wb") as log:
        backend = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"], cwd=ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_up(f"http://127.0.0.1:{llama_port}/v1/models", llama, timeout=120)
        wait_until_up(f"http://127.0.0.1:{backend_port}/api/health", backend)
        # Exactly what the backend sends for a new session's first turn.
        messages = [{"role": "system", "content": DEFAULTS["SYSTEM_PROMPT"]}, {"role": "user", "content": QUESTION}]
        direct_body = {"messages": messages, "stream": True, "max_tokens": args.max_tokens, "temperature": 0,
                       "model": local_llm.MODEL_ALIAS, "stream_options": {"include_usage": True}}
        rows = {"direct": [], "backend": []}
        cpu = {"backend": 0.0, "llama_direct": 0.0, "llama_backend": 0.0}
        stream(llama_port, "/v1/chat/completions", direct_body, direct_text)  # warm-up
        for _ in range(args.rounds):
            llama_cpu = cpu_seconds(llama.pid)
            rows["direct"].append(stream(llama_port, "/v1/chat/completions", direct_body, direct_text))
            cpu["llama_direct"] += cpu_seconds(llama.pid) - llama_cpu

            body = {"session_id": session(backend_port), "message": QUESTION,
                    "max_new_tokens": args.max_tokens, "temperature": 0}
            backend_cpu, llama_cpu = cpu_seconds(backend.pid), cpu_seconds(llama.pid)
            rows["backend"].append(stream(backend_port, "/api/chat/stream", body, backend_text))
            cpu["backend"] += cpu_seconds(backend.pid) - backend_cpu
            cpu["llama_backend"] += cpu_seconds(llama.pid) - llama_cpu
    finally:
        stop_process(backend)
        stop_process(llama)

    def median(kind, index):
        return statistics.median(r[index] for r in rows[kind])
    pieces = {kind: sum(r[1] for r in rows[kind]) for kind in rows}
    report = {
        "rounds": args.rounds, "max_tokens": args.max_tokens, "llama_threads": args.threads,
        "pieces": pieces,
        "ttft_ms": {"direct": 1000 * median("direct", 0), "backend": 1000 * median("backend", 0),
                    "added_median": 1000 * statistics.median(b[0] - d[0] for d, b in zip(rows["direct"],
                                                                                        rows["backend"]))},
        "tokens_per_s": {k: pieces[k] / sum(r[2] for r in rows[k]) for k in rows},
        "cpu_ms_per_token": {"backend": 1000 * cpu["backend"] / pieces["backend"],
                             "llama_direct": 1000 * cpu["llama_direct"] / pieces["direct"],
                             "llama_via_backend": 1000 * cpu["llama_backend"] / pieces["backend"]},
        "load_average": os.getloadavg(),
    }
    print(f"{args.rounds} rounds of {args.max_tokens} tokens, llama.cpp with {args.threads} thread(s), "
          f"load average {report['load_average'][0]:.1f}")
    print(f"time to first token: direct {report['ttft_ms']['direct']:.0f} ms, "
          f"through the backend {report['ttft_ms']['backend']:.0f} ms, "
          f"added (median of pairs) {report['ttft_ms']['added_median']:.1f} ms")
    print(f"tokens/s: direct {report['tokens_per_s']['direct']:.1f}, backend {report['tokens_per_s']['backend']:.1f}")
    print(f"CPU per token: backend {report['cpu_ms_per_token']['backend']:.2f} ms, "
          f"llama.cpp {report['cpu_ms_per_token']['llama_direct']:.2f} ms (direct) / "
          f"{report['cpu_ms_per_token']['llama_via_backend']:.2f} ms (via the backend)")
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"real_llm-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
