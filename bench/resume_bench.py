"""Re-attach benchmark: how soon a client that re-attaches through another
server gets its first missed byte, and how far behind the producer a client
attached through another server follows.

One run starts the stand-in LLM and two gunicorn servers (A and B) on one
SQLite database, as two hosts would share one. Each round streams an answer
from A, reads part of it, drops the connection, and re-attaches through B
with ?after=<position read>; a second client follows the same reply through
B from the start, beside A's own stream.

    python bench/resume_bench.py --rounds 20

Prints the medians and p90s (milliseconds) and writes JSON to bench/results/.
"""
import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stream_bench import ROOT, free_port, start, stop  # noqa: E402

sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from conftest import SSEStream  # noqa: E402


def gunicorn(db, llm):
    port = free_port()
    env = {"CHATBOT_BIND": f"127.0.0.1:{port}", "CHATBOT_DATABASE": db, "CHATBOT_LLM_URL": llm,
           "CHATBOT_AUTH": "disabled", "CHATBOT_WORKERS": "2", "CHATBOT_THREADS": "32"}
    url = f"http://127.0.0.1:{port}"
    return start([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"], url + "/api/health", env), url


def text_of(events):
    return "".join(data["content"] for name, data, _ in events if name == "delta")


def one_round(a, b):
    sid = requests.post(a + "/api/sessions").json()["session_id"]
    first = SSEStream(a, "/api/chat/stream", {"session_id": sid, "message": "@@words=120 @@delay=0.02"})
    events = first.events()
    start_event = next(events)[1]
    mid = start_event["message_id"]
    follower, arrivals = SSEStream(b, f"/api/sessions/{sid}/messages/{mid}/stream"), {}

    def follow():
        got = []
        for event in follower.events():
            got.append(event)
            if event[0] == "delta":
                arrivals[len(text_of(got))] = event[2]
    thread = threading.Thread(target=follow)
    thread.start()
    got, local = [], {}
    for event in events:
        got.append(event)
        if event[0] == "delta":
            local[len(text_of(got))] = event[2]
        if len(got) > 40:
            break
    first.close()   # the producer's client drops: the reply goes on within the grace
    asked = time.monotonic()
    again = SSEStream(b, f"/api/sessions/{sid}/messages/{mid}/stream?after={len(text_of(got))}")
    first_missed = next(e for e in again.events() if e[0] == "delta")[2] - asked
    list(again.events())
    thread.join(30)
    lags = [arrivals[p] - local[p] for p in arrivals if p in local]
    return first_missed, lags


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp()
    port = free_port()
    llm = f"http://127.0.0.1:{port}"
    procs = [start([sys.executable, "-m", "chatbot.standin", "--port", str(port), "--delay", "0.02"],
                   llm + "/health")]
    try:
        db = str(Path(tmp) / "bench.sqlite")
        pa, a = gunicorn(db, llm)
        procs.append(pa)
        pb, b = gunicorn(db, llm)
        procs.append(pb)
        firsts, lags = [], []
        for _ in range(args.rounds):
            first_missed, round_lags = one_round(a, b)
            firsts.append(first_missed)
            lags += round_lags
    finally:
        for proc in procs:
            stop(proc)

    def ms(values, q):
        return round(statistics.quantiles(values, n=10)[q - 1] * 1000 if q != 5 else
                     statistics.median(values) * 1000, 1)
    result = {"rounds": args.rounds,
              "first_missed_byte_ms": {"p50": ms(firsts, 5), "p90": ms(firsts, 9)},
              "follower_lag_ms": {"p50": ms(lags, 5), "p90": ms(lags, 9), "samples": len(lags)}}
    print(json.dumps(result, indent=2))
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    (out / f"resume-{stamp}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
