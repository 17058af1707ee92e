"""Warm `predict` and `ask` through `kalmkg serve`, against the same calls in-process (the baseline, in the
same run): p50/p95 over N requests each, then the throughput of 8 concurrent clients.

    python bench/serve_latency.py                  # builds bench/_work/serve-world once (the demo's steps)
    python bench/serve_latency.py --requests 20    # quicker

The workspace is the demo's: the sample graph, a 40-step KaLM run of the embedded SmolLM2-135M, its
Q8_0 export. Questions and link queries rotate through fixed lists (the demo's). The server and the
in-process baseline run one after the other, never at once (2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = ROOT / "bench" / "_work" / "serve-world"
QUESTIONS = ["What is the nationality of Marie Curie's spouse?", "Who founded Apple?",
             "What money do people use in India?", "Who won the 1998 FIFA World Cup?",
             "Where was Bill Gates born?"]
QUERIES = [("Paris", "capital_of", "?"), ("?", "founded_by", "Bill Gates"), ("Marie Curie", "spouse", "?"),
           ("?", "capital_of", "France"), ("Alan Turing", "born_in", "?")]


def kalmkg(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "kalmkg", "-w", str(WORK), *args], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)


def build_workspace() -> None:
    """The demo's steps, once."""
    if any(WORK.glob("models/*.gguf")):
        return
    kalmkg("ingest", str(ROOT / "sample_graphs" / "world.ttl"))
    kalmkg("split", "--valid", "0.1", "--test", "0.1", "--seed", "0")
    kalmkg("train", "--max-steps", "40", "--eval-every", "20", "--eval-limit", "30", "--run-name", "demo")
    kalmkg("export", "--quant", "Q8_0")


def timed(calls) -> list[float]:
    out = []
    for call in calls:
        t = time.perf_counter()
        call()
        out.append(time.perf_counter() - t)
    return out


def summary(seconds: list[float]) -> tuple[float, float]:
    ms = np.asarray(seconds) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 95))


def concurrent(call, n: int, clients: int) -> float:
    """Requests per second of `clients` threads making `n` calls in all."""
    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda i: call(i), range(n)))
    return n / (time.perf_counter() - t)


def in_process(n: int, threads: int) -> dict:
    from kalmkg.serve.service import Service
    from kalmkg.workspace import Workspace

    service = Service(Workspace(WORK), n_threads=threads)
    service.predict(*QUERIES[0], k=5)  # warm: the index and tables read once
    service.ask(QUESTIONS[0])
    return {"predict": timed([lambda i=i: service.predict(*QUERIES[i % len(QUERIES)], k=5) for i in range(n)]),
            "ask": timed([lambda i=i: service.ask(QUESTIONS[i % len(QUESTIONS)]) for i in range(n)])}


def through_server(n: int, threads: int, clients: int) -> dict:
    import re

    import requests

    log = WORK.parent / "serve-latency.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "kalmkg", "-w", str(WORK), "serve", "--port", "0",
                                 "--threads", str(threads)], stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "COLUMNS": "300"})
    try:
        url = None
        for _ in range(600):
            found = re.search(r"on (http://127\.0\.0\.1:\d+) ", log.read_text())
            if found:
                try:
                    requests.get(found.group(1) + "/health", timeout=5)
                    url = found.group(1)
                    break
                except requests.RequestException:
                    pass
            if proc.poll() is not None:
                sys.exit("the server ended: " + log.read_text())
            time.sleep(0.2)
        session = requests.Session()

        def predict(i: int):
            head, rel, tail = QUERIES[i % len(QUERIES)]
            r = session.post(url + "/v1/predict", json={"head": head, "relation": rel, "tail": tail, "k": 5}, timeout=300)
            r.raise_for_status()

        def ask(i: int):
            r = session.post(url + "/v1/chat/completions", timeout=300, json={
                "model": "kalmkg", "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]})
            r.raise_for_status()

        predict(0)
        ask(0)
        out = {"predict": timed([lambda i=i: predict(i) for i in range(n)]),
               "ask": timed([lambda i=i: ask(i) for i in range(n)])}
        # each client its own connection
        out["predict_rps"] = concurrent(lambda i: requests.post(url + "/v1/predict", timeout=300, json=dict(
            zip(("head", "relation", "tail"), QUERIES[i % len(QUERIES)]), k=5)).raise_for_status(), n, clients)
        out["ask_rps"] = concurrent(lambda i: requests.post(url + "/v1/chat/completions", timeout=300, json={
            "model": "kalmkg", "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]}
        ).raise_for_status(), max(clients, n // 4), clients)
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads (this machine's cores)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    build_workspace()
    base = in_process(args.requests, args.threads)
    served = through_server(args.requests, args.threads, args.clients)
    rows = {}
    print(f"| call ({args.requests} requests, warm) | in-process p50 / p95 ms | server p50 / p95 ms | "
          f"server, {args.clients} clients |\n|---|---|---|---|")
    for name, unit in (("predict", "predict_rps"), ("ask", "ask_rps")):
        b, s = summary(base[name]), summary(served[name])
        rows[name] = {"in_process_ms": b, "server_ms": s, "concurrent_rps": served[unit]}
        label = "predict (top 5, GGUF)" if name == "predict" else "ask (chat completion)"
        print(f"| {label} | {b[0]:.1f} / {b[1]:.1f} | {s[0]:.1f} / {s[1]:.1f} | {served[unit]:.2f} requests/s |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
