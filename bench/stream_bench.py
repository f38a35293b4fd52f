"""Streaming benchmark: the stand-in LLM called directly vs through the backend.

One run starts the stand-in LLM server and the service under gunicorn (the
repository's gunicorn.conf.py, its defaults unless --workers/--threads say
otherwise), then, for each concurrency level, streams the same answer

  direct   POST {stand-in}/chat/stream       (what the LLM server alone gives)
  backend  POST {service}/api/chat/stream    (the same, relayed by the service)

and reports time to first token (p50, p99), tokens/s, the TTFT the backend
adds, and the CPU seconds gunicorn (master and workers, from /proc) spends
per 1000 relayed tokens. A small asyncio client reads raw bytes off each
socket as they arrive, so hundreds of streams need no threads.

    python bench/stream_bench.py --concurrency 1 100 --words 100 --delay 0.02

Prints a table and writes JSON to bench/results/. See bench/README.md.
"""
import argparse
import asyncio
import codecs
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
TEXT_FIELDS = ("token", "content", "text", "delta", "response")


# --- processes -------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, url, env=None, timeout=60, log=None, cwd=ROOT):
    proc = subprocess.Popen(args, cwd=cwd, env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=open(log, "wb") if log else subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{args} exited with {proc.returncode}")
        try:
            requests.get(url, timeout=2)
            return proc
        except requests.RequestException:
            time.sleep(0.1)
    stop(proc)
    raise SystemExit(f"{url} did not come up")


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pid):
    """utime + stime of one process, in seconds (fields 14 and 15 of /proc/<pid>/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def process_tree(pid):
    """gunicorn's master and its workers."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [pid] + [int(p) for p in f.read().split()]
    except OSError:
        return [pid]


def _environ(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def pss_kb(pid):
    """Proportional set size of one process, in KB (shared pages split among their users)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_by_kind(pid):
    """A process's PSS in KB by kind of mapping: where memory per stream goes.
    Thread stacks are 8 MB mappings (glibc's default), malloc's per-thread arenas
    64 MB ones, the main heap [heap]; the rest is other anonymous memory (Python's
    own object arenas among it) and files."""
    kinds = {}
    try:
        with open(f"/proc/{pid}/smaps") as f:
            kind = None
            for line in f:
                first = line.split()
                if "-" in first[0] and len(first) >= 5 and ":" not in first[0]:
                    lo, hi = (int(x, 16) for x in first[0].split("-"))
                    name = first[5] if len(first) > 5 else ""
                    size = hi - lo
                    if name.startswith("["):
                        kind = name
                    elif name:
                        kind = "files"
                    elif size in (8 * 1024 * 1024, 8 * 1024 * 1024 - 4096) or 8 * 1024 * 1024 <= size <= 8 * 1024 * 1024 + 4096:
                        kind = "thread stacks (8 MB maps)"
                    elif size >= 32 * 1024 * 1024:
                        kind = "malloc arenas (64 MB maps)"
                    else:
                        kind = "other anonymous"
                elif first[0] == "Pss:":
                    kinds[kind] = kinds.get(kind, 0) + int(first[1])
    except OSError:
        pass
    return kinds


def workers_pss_by_kind(pid):
    total = {}
    for p in process_tree(pid)[1:]:
        for kind, kb in pss_by_kind(p).items():
            total[kind] = total.get(kind, 0) + kb
    return total


def workers_pss_kb(pid):
    return sum(pss_kb(p) for p in process_tree(pid)[1:])


def cpu_snapshot(pid):
    return {p: cpu_seconds(p) for p in process_tree(pid)}


def cpu_used(before, after):
    # A worker replaced during the phase loses its last ticks; the count of
    # processes is reported, so a change shows.
    return sum(after[p] - before.get(p, 0.0) for p in after)


# --- the client ------------------------------------------------------------------

@dataclass
class Result:
    ok: bool = False
    tokens: int = 0
    ttft: float | None = None      # seconds from sending the request to the first text
    duration: float | None = None  # seconds from sending the request to the end of the stream
    first_to_last: float | None = None
    error: str | None = None


def is_text(kind, block):
    """Whether one SSE block carries text: a backend `delta`, or a stand-in data line with text."""
    lines = block.split("\n")
    if kind == "backend":
        return "event: delta" in lines
    for line in lines:
        if line.startswith("data:"):
            data = line[5:].strip()
            if data == "[DONE]":
                return False
            try:
                obj = json.loads(data)
            except ValueError:
                return bool(data)
            if isinstance(obj, dict):
                return any(isinstance(obj.get(k), str) and obj[k] for k in TEXT_FIELDS)
    return False


def is_end(kind, block):
    if kind == "backend":
        return "event: done" in block or "event: error" in block
    return "data: [DONE]" in block


async def read_body(reader, headers):
    """Yield the response body as it arrives, undoing chunked transfer encoding."""
    if "transfer-encoding: chunked" in headers:
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                return
            data = await reader.readexactly(size)
            await reader.readexactly(2)
            yield data
    else:
        while data := await reader.read(65536):
            yield data


async def stream_once(kind, host, port, path, body, timeout, extra_headers="", opened=None, hold=None):
    """One stream, read to its end. For the memory phase: `opened` (a list) gets
    a mark once the first text arrived, and the stream is then left open until
    the `hold` event is set."""
    result = Result()
    payload = json.dumps(body).encode()
    sent = time.perf_counter()
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(payload)}\r\nConnection: close\r\n{extra_headers}\r\n".encode() + payload)
            status = (await reader.readline()).decode()
            headers = ""
            while (line := await reader.readline()) not in (b"\r\n", b""):
                headers += line.decode().lower()
            if " 200 " not in status:
                result.error = status.strip()
                return result
            buffer, first, last = "", None, None
            decoder = codecs.getincrementaldecoder("utf-8")()
            async for data in read_body(reader, headers):
                buffer += decoder.decode(data)
                while "\n\n" in buffer:
                    block, buffer = buffer.split("\n\n", 1)
                    now = time.perf_counter()
                    if is_text(kind, block):
                        result.tokens += 1
                        if first is None and opened is not None:
                            opened.append(1)
                            await hold.wait()
                            result.ok = True
                            return result
                        first = first or now
                        last = now
                    if is_end(kind, block):
                        result.ok = "event: error" not in block
                        if not result.ok:
                            result.error = block.rsplit("data: ", 1)[-1][:200]
            result.duration = time.perf_counter() - sent
            if first is not None:
                result.ttft = first - sent
                result.first_to_last = last - first
            if not result.ok and result.error is None:
                result.error = "stream ended without its final event"
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
        result.error = f"{type(e).__name__}: {e}"
    finally:
        if writer is not None:
            writer.close()
    return result


async def run_phase(kind, host, port, path, bodies, rounds, ramp, timeout, extra_headers=""):
    """len(bodies) clients at once, each streaming `rounds` times in a row."""
    async def client(i, body):
        await asyncio.sleep(ramp * i / max(len(bodies), 1))  # spread the connects a little
        return [await stream_once(kind, host, port, path, body, timeout, extra_headers) for _ in range(rounds)]
    started = time.perf_counter()
    per_client = await asyncio.gather(*(client(i, b) for i, b in enumerate(bodies)))
    return [r for results in per_client for r in results], time.perf_counter() - started


# --- figures -----------------------------------------------------------------------

def percentile(values, p):
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def hold_open(host, port, bodies, extra_headers, gunicorn_pid, timeout, settle):
    """Open len(bodies) streams, wait until each has its first text, measure the
    workers' PSS while they are all open, then leave."""
    opened, hold = [], asyncio.Event()
    tasks = [asyncio.create_task(stream_once("backend", host, port, "/api/chat/stream", b, timeout,
                                             extra_headers, opened, hold)) for b in bodies]
    deadline = time.monotonic() + timeout
    while len(opened) < len(bodies) and time.monotonic() < deadline and not all(t.done() for t in tasks):
        await asyncio.sleep(0.2)
    await asyncio.sleep(settle)  # the streams run a while: what they hold is what a running stream holds
    pss, kinds = workers_pss_kb(gunicorn_pid), workers_pss_by_kind(gunicorn_pid)
    hold.set()
    results = await asyncio.gather(*tasks)
    return pss, kinds, len(opened), [r.error for r in results if r.error]


def summarise(results, wall):
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    rates = [(r.tokens - 1) / r.first_to_last for r in ok if r.tokens > 1 and r.first_to_last]
    tokens = sum(r.tokens for r in results)
    errors = sorted({r.error for r in results if r.error})
    return {
        "requests": len(results), "ok": len(ok),
        "ttft_p50_ms": _ms(percentile(ttfts, 50)), "ttft_p99_ms": _ms(percentile(ttfts, 99)),
        "tokens_per_s_per_stream_p50": _round(percentile(rates, 50)),
        "tokens_per_s_total": _round(tokens / wall if wall else None),
        "tokens": tokens, "wall_s": round(wall, 3), "errors": errors[:5],
    }


def _ms(seconds):
    return None if seconds is None else round(seconds * 1000, 2)


def _round(x):
    return None if x is None else round(x, 1)


def fmt(x, unit=""):
    return "-" if x is None else f"{x:g}{unit}"


def print_table(rows):
    head = ["conc", "path", "ok/req", "TTFT p50", "TTFT p99", "added p50", "added p99",
            "tok/s/stream", "tok/s total", "vs direct", "CPU s/1k tok", "load"]  # CPU: the stand-in's (direct), gunicorn's (backend)
    lines = [head]
    for row in rows:
        for kind in ("direct", "backend"):
            s = row[kind]
            backend = kind == "backend"
            lines.append([
                str(row["concurrency"]), kind, f"{s['ok']}/{s['requests']}",
                fmt(s["ttft_p50_ms"], " ms"), fmt(s["ttft_p99_ms"], " ms"),
                fmt(row["added_ttft_p50_ms"], " ms") if backend else "",
                fmt(row["added_ttft_p99_ms"], " ms") if backend else "",
                fmt(s["tokens_per_s_per_stream_p50"]), fmt(s["tokens_per_s_total"]),
                fmt(row["throughput_vs_direct"]) if backend else "",
                fmt(row["gunicorn_cpu_s_per_1000_tokens" if backend else "standin_cpu_s_per_1000_tokens"]),
                fmt(row["loadavg_1min"]) if backend else "",
            ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))
    for row in rows:
        for kind in ("direct", "backend"):
            for error in row[kind]["errors"]:
                print(f"  c={row['concurrency']} {kind} error: {error}")


# --- the run -----------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 100])
    parser.add_argument("--words", type=int, default=100, help="pieces of text in each answer")
    parser.add_argument("--delay", type=float, default=0.02, help="stand-in's seconds between pieces")
    parser.add_argument("--rounds", type=int, default=2, help="streams each client makes in a row")
    parser.add_argument("--min-samples", type=int, default=20,
                        help="at low concurrency, more rounds until this many streams")
    parser.add_argument("--ramp", type=float, default=0.5, help="seconds over which clients start")
    parser.add_argument("--timeout", type=float, default=300, help="seconds allowed for one stream")
    parser.add_argument("--workers", help="CHATBOT_WORKERS (default: gunicorn.conf.py's)")
    parser.add_argument("--threads", help="CHATBOT_THREADS (default: gunicorn.conf.py's)")
    parser.add_argument("--memory", type=int, default=0, metavar="N",
                        help="at the end, hold N long streams open and report the workers' PSS per stream")
    parser.add_argument("--py-spy", type=int, default=0, metavar="SECONDS",
                        help="record each worker with py-spy for SECONDS during the last backend phase"
                             " (raw collapsed stacks in --out; the profiler costs CPU too)")
    parser.add_argument("--auth", action="store_true",
                        help="API keys on (one key, limits raised): the key check and rate limit in the path")
    parser.add_argument("--settle", type=float, default=8,
                        help="seconds the memory phase's streams run before their PSS is read")
    parser.add_argument("--resume-wait", type=float, default=8,
                        help="seconds to wait before the memory phase (the grace period of replies left)")
    parser.add_argument("--root", default=str(ROOT),
                        help="the checkout whose service is measured (this script stays the same), e.g. an"
                             " older commit's tree, for a before/after comparison on one machine")
    parser.add_argument("--database", help="CHATBOT_DATABASE, e.g. a postgresql:// URL "
                                           "(default: a throw-away SQLite file)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    if args.words > 512:
        parser.error("--words is capped by the service's DEFAULT_MAX_NEW_TOKENS (512)")

    tmp = tempfile.mkdtemp(prefix="stream-bench-")
    standin_port, service_port = free_port(), free_port()
    standin = start([sys.executable, "-m", "chatbot.standin", "--port", str(standin_port),
                     "--delay", str(args.delay)], f"http://127.0.0.1:{standin_port}/health")
    env = {"CHATBOT_BIND": f"127.0.0.1:{service_port}",
           "CHATBOT_DATABASE": args.database or f"{tmp}/bench.sqlite",
           "CHATBOT_LLM_URL": f"http://127.0.0.1:{standin_port}", "CHATBOT_LLM_PROTOCOL": "midm",
           # Keys off: one client key would meet the per-key stream and rate limits.
           "CHATBOT_AUTH": "disabled"}
    if args.auth:
        env.update(CHATBOT_AUTH="required", CHATBOT_RATE_LIMIT_PER_MINUTE="10000000",
                   CHATBOT_MAX_STREAMS_PER_KEY="0")
    if args.workers:
        env["CHATBOT_WORKERS"] = args.workers
    if args.threads:
        env["CHATBOT_THREADS"] = args.threads
    log = f"{tmp}/gunicorn.log"
    gunicorn = start([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"],
                     f"http://127.0.0.1:{service_port}/api/health", env, log=log, cwd=args.root)
    service = f"http://127.0.0.1:{service_port}"
    headers, raw_headers = {}, ""
    if args.auth:
        sys.path.insert(0, str(ROOT))
        from chatbot import access, db
        conn = db.connect(env["CHATBOT_DATABASE"])
        headers = {"Authorization": f"Bearer {access.create_key(conn, 'bench')}"}
        conn.close()
        raw_headers = f"Authorization: {headers['Authorization']}\r\n"
    message = f"@@words={args.words}"
    direct_body = {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                                {"role": "user", "content": message}],
                   "max_new_tokens": 512, "temperature": 0.7, "do_sample": False}
    rows, memory, profiles = [], None, []
    load_before = os.getloadavg()
    try:
        # Warm up both paths (imports, first connections) before measuring.
        warm = requests.post(service + "/api/sessions", headers=headers).json()["session_id"]
        asyncio.run(stream_once("backend", "127.0.0.1", service_port, "/api/chat/stream",
                                {"session_id": warm, "message": "@@words=3"}, 30, raw_headers))
        asyncio.run(stream_once("direct", "127.0.0.1", standin_port, "/chat/stream", direct_body, 30))
        for concurrency in args.concurrency:
            rounds = max(args.rounds, math.ceil(args.min_samples / concurrency))
            print(f"concurrency {concurrency}: {rounds} round(s) of {concurrency} streams of "
                  f"{args.words} pieces, {args.delay} s apart ...", flush=True)
            standin_before = cpu_seconds(standin.pid)
            results, wall = asyncio.run(run_phase(
                "direct", "127.0.0.1", standin_port, "/chat/stream", [direct_body] * concurrency,
                rounds, args.ramp, args.timeout))
            direct = summarise(results, wall)
            standin_cpu = cpu_seconds(standin.pid) - standin_before
            # One session per client: a session takes one reply at a time.
            sessions = [requests.post(service + "/api/sessions", headers=headers).json()["session_id"]
                        for _ in range(concurrency)]
            spies = []
            if args.py_spy and concurrency == args.concurrency[-1]:
                Path(args.out).mkdir(parents=True, exist_ok=True)
                spies = [(pid, subprocess.Popen(
                    [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid), "--nonblocking", "--gil",
                     "--duration", str(int(args.py_spy)), "--format", "raw", "--output",
                     str(Path(args.out) / f"py-spy-{pid}.txt")],
                    stdout=subprocess.DEVNULL, stderr=open(Path(args.out) / f"py-spy-{pid}.log", "wb")))
                    for pid in process_tree(gunicorn.pid)[1:]]
            load = os.getloadavg()[0]
            before = cpu_snapshot(gunicorn.pid)
            results, wall = asyncio.run(run_phase(
                "backend", "127.0.0.1", service_port, "/api/chat/stream",
                [{"session_id": s, "message": message} for s in sessions], rounds, args.ramp, args.timeout,
                raw_headers))
            after = cpu_snapshot(gunicorn.pid)
            for pid, spy in spies:
                spy.wait()
                profiles.append(str(Path(args.out) / f"py-spy-{pid}.txt"))
            backend = summarise(results, wall)
            cpu = cpu_used(before, after)
            rows.append({
                "concurrency": concurrency, "rounds": rounds, "direct": direct, "backend": backend,
                "loadavg_1min": round(load, 2),
                "throughput_vs_direct": round(backend["tokens_per_s_total"] / direct["tokens_per_s_total"], 3)
                if backend["tokens_per_s_total"] and direct["tokens_per_s_total"] else None,
                "added_ttft_p50_ms": _diff(backend["ttft_p50_ms"], direct["ttft_p50_ms"]),
                "added_ttft_p99_ms": _diff(backend["ttft_p99_ms"], direct["ttft_p99_ms"]),
                "gunicorn_cpu_s": round(cpu, 3), "gunicorn_processes": len(after),
                "gunicorn_cpu_s_per_1000_tokens": round(cpu / backend["tokens"] * 1000, 3)
                if backend["tokens"] else None,
                # for scale: what the stand-in (also Python) spends making and sending them
                "standin_cpu_s_per_1000_tokens": round(standin_cpu / direct["tokens"] * 1000, 3)
                if direct["tokens"] else None,
            })
        if args.memory:
            time.sleep(args.resume_wait)  # replies of the last phase end, their threads go idle
            idle, idle_kinds = workers_pss_kb(gunicorn.pid), workers_pss_by_kind(gunicorn.pid)
            sessions = [requests.post(service + "/api/sessions", headers=headers).json()["session_id"]
                        for _ in range(args.memory)]
            long = "@@words=400 @@delay=0.1"  # 40 s: open for the whole measurement
            pss, kinds, opened, errors = asyncio.run(hold_open(
                "127.0.0.1", service_port, [{"session_id": s, "message": long} for s in sessions],
                raw_headers, gunicorn.pid, min(args.timeout, 60), args.settle))
            memory = {"streams": args.memory, "opened": opened, "idle_pss_kb": idle, "open_pss_kb": pss,
                      "kb_per_stream": round((pss - idle) / max(opened, 1), 1), "errors": errors[:5],
                      "workers": len(process_tree(gunicorn.pid)) - 1,
                      "kb_per_stream_by_kind": {k: round((kinds.get(k, 0) - idle_kinds.get(k, 0)) / max(opened, 1), 1)
                                                for k in sorted(set(kinds) | set(idle_kinds))}}
    finally:
        workers = process_tree(gunicorn.pid)[1:]
        stop(gunicorn)
        stop(standin)
        for pid in workers:  # a worker stuck in a request outlives a master killed after the wait
            if f"CHATBOT_BIND={env['CHATBOT_BIND']}".encode() in _environ(pid):
                os.kill(pid, signal.SIGKILL)

    report = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "database")},
        "database": "postgresql" if args.database and "://" in args.database else "sqlite",
        "commit": subprocess.run(["git", "-C", args.root, "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip() or args.root,
        "gunicorn": {"workers": args.workers or "gunicorn.conf.py default",
                     "threads": args.threads or "gunicorn.conf.py default"},
        "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "results": rows,
        "memory": memory,
        "py_spy": profiles,
    }
    print()
    print_table(rows)
    if memory:
        print(f"\nmemory: workers' PSS {memory['idle_pss_kb'] / 1024:.1f} MB idle, "
              f"{memory['open_pss_kb'] / 1024:.1f} MB with {memory['opened']} streams open: "
              f"{memory['kb_per_stream']} KB per open stream ({memory['workers']} workers)")
        print("  per stream by kind: " + ", ".join(f"{k} {v} KB" for k, v in memory["kb_per_stream_by_kind"].items()
                                                    if abs(v) >= 0.5))
    for path in profiles:
        print(f"py-spy: {path}")
    print(f"\nload average before/after: {load_before[0]:.1f} / {report['machine']['loadavg_after'][0]:.1f} "
          f"on {os.cpu_count()} CPUs (client, stand-in and service share them)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"stream_bench-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"JSON: {path}")
    print(f"gunicorn's log: {log}")


def _diff(a, b):
    return None if a is None or b is None else round(a - b, 2)


if __name__ == "__main__":
    main()
