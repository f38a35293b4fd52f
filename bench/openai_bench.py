"""What the OpenAI framing costs: /v1/chat/completions beside /api/chat/stream.

One run starts the stand-in LLM and the service under gunicorn (as
bench/stream_bench.py does, whose helpers it uses), then, for each
concurrency level, streams the same answer three ways, one after the other:

  api      POST /api/chat/stream          (a session made beforehand, not timed)
  v1       POST /v1/chat/completions      (X-Session-Id names a session made beforehand)
  v1-new   POST /v1/chat/completions      (no X-Session-Id: a new session per request,
                                           as an OpenAI client's first message makes)

and reports time to first token (p50, p99), what v1 adds to api's, and
gunicorn's CPU seconds per 1000 relayed pieces of text.

    python bench/openai_bench.py --concurrency 1 50 --words 100 --delay 0.02
"""
import argparse
import asyncio
import codecs
import json
import math
import os
import signal
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stream_bench import (ROOT, Result, _environ, cpu_snapshot, cpu_used, fmt, free_port,  # noqa: E402
                          process_tree, read_body, start, stop, summarise)

PATHS = {"api": "/api/chat/stream", "v1": "/v1/chat/completions", "v1-new": "/v1/chat/completions"}


def is_text(kind, block):
    if kind == "api":
        return "event: delta" in block.split("\n")
    for line in block.split("\n"):
        if line.startswith("data: {"):
            choices = json.loads(line[6:]).get("choices") or [{}]
            return bool(choices[0].get("delta", {}).get("content"))
    return False


def end_of(kind, block):
    """None while the stream goes on; else whether it ended well."""
    if kind == "api":
        if "event: done" in block:
            return True
        return False if "event: error" in block else None
    if "data: [DONE]" in block:
        return True
    return False if '"error":' in block else None


async def stream_once(kind, port, body, headers, timeout):
    result, writer = Result(), None
    payload = json.dumps(body).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sent = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"POST {PATHS[kind]} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json"
                         f"\r\n{extra}Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
            status = (await reader.readline()).decode()
            head = ""
            while (line := await reader.readline()) not in (b"\r\n", b""):
                head += line.decode().lower()
            if " 200 " not in status:
                result.error = status.strip()
                return result
            buffer, first, last = "", None, None
            decoder = codecs.getincrementaldecoder("utf-8")()
            async for data in read_body(reader, head):
                buffer += decoder.decode(data)
                while "\n\n" in buffer:
                    block, buffer = buffer.split("\n\n", 1)
                    now = time.perf_counter()
                    if is_text(kind, block):
                        result.tokens += 1
                        first, last = first or now, now
                    ended = end_of(kind, block)
                    if ended is not None:
                        result.ok = ended
                        result.error = None if ended else block[-200:]
            result.duration = time.perf_counter() - sent
            if first is not None:
                result.ttft, result.first_to_last = first - sent, last - first
            if not result.ok and result.error is None:
                result.error = "stream ended without its final event"
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
        result.error = f"{type(e).__name__}: {e}"
    finally:
        if writer is not None:
            writer.close()
    return result


async def run_phase(kind, port, requests_, rounds, ramp, timeout):
    async def client(i, body, headers):
        await asyncio.sleep(ramp * i / max(len(requests_), 1))
        return [await stream_once(kind, port, body, headers, timeout) for _ in range(rounds)]
    started = time.perf_counter()
    per_client = await asyncio.gather(*(client(i, b, h) for i, (b, h) in enumerate(requests_)))
    return [r for results in per_client for r in results], time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 50])
    parser.add_argument("--words", type=int, default=100)
    parser.add_argument("--delay", type=float, default=0.02)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--min-samples", type=int, default=20)
    parser.add_argument("--ramp", type=float, default=0.5)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="openai-bench-")
    standin_port, port = free_port(), free_port()
    standin = start([sys.executable, "-m", "chatbot.standin", "--port", str(standin_port),
                     "--delay", str(args.delay)], f"http://127.0.0.1:{standin_port}/health")
    env = {"CHATBOT_BIND": f"127.0.0.1:{port}", "CHATBOT_DATABASE": f"{tmp}/bench.sqlite",
           "CHATBOT_LLM_URL": f"http://127.0.0.1:{standin_port}", "CHATBOT_LLM_PROTOCOL": "midm",
           "CHATBOT_AUTH": "disabled"}   # one client key would meet the per-key limits
    log = f"{tmp}/gunicorn.log"
    gunicorn = start([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"],
                     f"http://127.0.0.1:{port}/api/health", env, log=log)
    service = f"http://127.0.0.1:{port}"
    message = f"@@words={args.words}"

    def new_session():
        return requests.post(service + "/api/sessions").json()["session_id"]

    def request_for(kind):
        if kind == "api":
            return {"session_id": new_session(), "message": message}, {}
        body = {"model": "x", "stream": True, "messages": [{"role": "user", "content": message}]}
        return body, ({SESSION: new_session()} if kind == "v1" else {})

    rows = []
    try:
        for kind in PATHS:   # warm up every path
            asyncio.run(stream_once(kind, port, *request_for(kind), 30))
        for concurrency in args.concurrency:
            rounds = max(args.rounds, math.ceil(args.min_samples / concurrency))
            row = {"concurrency": concurrency, "rounds": rounds}
            for kind in PATHS:
                print(f"concurrency {concurrency}, {kind}: {rounds} round(s) ...", flush=True)
                requests_ = [request_for(kind) for _ in range(concurrency)]
                before = cpu_snapshot(gunicorn.pid)
                results, wall = asyncio.run(run_phase(kind, port, requests_, rounds, args.ramp, args.timeout))
                cpu = cpu_used(before, cpu_snapshot(gunicorn.pid))
                summary = summarise(results, wall)
                summary["cpu_s_per_1000_tokens"] = round(cpu / summary["tokens"] * 1000, 3) \
                    if summary["tokens"] else None
                row[kind] = summary
            rows.append(row)
    finally:
        workers = process_tree(gunicorn.pid)[1:]
        stop(gunicorn)
        stop(standin)
        for pid in workers:
            if f"CHATBOT_BIND={env['CHATBOT_BIND']}".encode() in _environ(pid):
                os.kill(pid, signal.SIGKILL)

    print()
    head = ["conc", "path", "ok/req", "TTFT p50", "TTFT p99", "added p50", "added p99", "CPU s/1k tok", "added CPU"]
    lines = [head]
    for row in rows:
        api = row["api"]
        for kind in PATHS:
            s = row[kind]
            added = kind != "api"

            def diff(key):
                return fmt(round(s[key] - api[key], 3)) if added and s[key] is not None and api[key] is not None \
                    else ""
            lines.append([str(row["concurrency"]), kind, f"{s['ok']}/{s['requests']}", fmt(s["ttft_p50_ms"], " ms"),
                          fmt(s["ttft_p99_ms"], " ms"), diff("ttft_p50_ms"), diff("ttft_p99_ms"),
                          fmt(s["cpu_s_per_1000_tokens"]), diff("cpu_s_per_1000_tokens")])
            for error in s["errors"]:
                print(f"  c={row['concurrency']} {kind} error: {error}")
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"openai_bench-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                "settings": {k: v for k, v in vars(args).items() if k != "out"},
                                "machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg()},
                                "results": rows}, indent=2))
    print(f"JSON: {path}\ngunicorn's log: {log}")


SESSION = "X-Session-Id"

if __name__ == "__main__":
    main()
