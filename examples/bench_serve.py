"""Requests/s and tokens/s of ``hybrid serve`` with 1, 2 and 4 concurrent clients.

Starts the server (the built-in tiny model unless ``-m``) on a free port of 127.0.0.1,
bounded to ``--limit`` seconds, sends ``--warm`` untimed requests, then for each
concurrency level sends ``-r`` completion requests from that many client threads
(each thread one keep-alive connection). Every
request has its own ``-p`` random prompt ids, so the prompt cache cannot serve it, and
asks for ``-n`` greedy tokens (fewer where the model emits a stop token: the table
counts what was generated). The server runs one request at a time (FIFO), so more
clients add waiting, not throughput; latency shows the queue.

``--shapes-20b N`` serves a file of N blocks at gpt-oss-20b shapes (random weights, the
tiny tokenizer's vocabulary), written once by ``bench_model.py``'s ``ensure_file`` (4
blocks: 1.7 GiB).

Run:
    .venv/bin/python examples/bench_serve.py [-m FILE | --shapes-20b 4] [--clients 1,2,4] [-r 16] [-p 64] [-n 64] [-t 2]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from hybrid.report import machine_line

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port, log):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "hybrid", "serve", "--port", str(port), "--device", args.device,
           "--log-level", "warning", "-c", str(args.p + args.n + 8)]
    cmd += (["-m", args.model] if args.model else []) + (["-t", str(args.threads)] if args.threads else [])
    if shutil.which("timeout"):  # the server stops itself even if this script dies
        cmd = ["timeout", str(args.limit)] + cmd
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    deadline = time.monotonic() + args.limit
    while time.monotonic() < deadline and p.poll() is None:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/v1/models")
            r = c.getresponse()
            if r.status == 200:
                return p, json.loads(r.read())["data"][0]
        except OSError:
            pass
        time.sleep(0.3)
    p.kill()
    log.seek(0)
    sys.exit(f"the server did not start:\n{log.read().decode()[-3000:]}")


def level(port, prompts, n, clients):
    """Send every prompt from ``clients`` threads; (wall s, latencies, usages)."""
    local, lat, use = threading.local(), [], []

    def ask(ids):
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        body = json.dumps({"model": "bench", "prompt": ids, "max_tokens": n, "temperature": 0})
        t0 = time.perf_counter()
        local.conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = local.conn.getresponse()
        out = json.loads(r.read())
        if r.status != 200:
            raise RuntimeError(out)
        lat.append(time.perf_counter() - t0)
        use.append(out["usage"])

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(ask, prompts))
    return time.perf_counter() - t0, lat, use


def shapes_20b(n_layers: int, out: Path | None) -> Path:
    import importlib.util

    from hybrid.model.tiny import default_model_path
    spec = importlib.util.spec_from_file_location("bench_model", Path(__file__).with_name("bench_model.py"))
    bench_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_model)
    path = out or default_model_path().with_name(f"gpt-oss-20b-shapes-{n_layers}L.gguf")
    return bench_model.ensure_file(path, n_layers)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", help="GGUF file (default: the built-in tiny model)")
    ap.add_argument("--clients", default="1,2,4", help="concurrency levels (default 1,2,4)")
    ap.add_argument("-r", "--requests", type=int, default=16, help="requests per level (default 16)")
    ap.add_argument("-p", type=int, default=64, help="prompt tokens per request (default 64)")
    ap.add_argument("-n", type=int, default=64, help="tokens to generate per request (default 64)")
    ap.add_argument("--warm", type=int, default=4, help="untimed requests first (default 4)")
    ap.add_argument("-t", "--threads", type=int, default=None, help="server's Numba threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--limit", type=int, default=900, help="seconds the server may live (default 900)")
    ap.add_argument("--shapes-20b", type=int, metavar="N", help="serve N blocks at gpt-oss-20b shapes")
    ap.add_argument("--out", type=Path, help="--shapes-20b: where the file goes (default: next to the tiny model)")
    args = ap.parse_args()
    if args.shapes_20b:
        args.model = str(shapes_20b(args.shapes_20b, args.out))
    levels = [int(c) for c in args.clients.split(",")]
    port = free_port()
    with tempfile.TemporaryFile() as log:
        server, card = start_server(args, port, log)
        try:
            rng = np.random.default_rng(0)
            vocab = card["meta"]["n_vocab"]
            # Not timed: the first requests run slower (measured: a first level at any concurrency took
            # ~2x a later one on the 20b-shaped file), so every level is timed warm.
            level(port, [rng.integers(0, vocab, args.p).tolist() for _ in range(args.warm)], args.n, 1)
            rows = []
            for c in levels:
                prompts = [rng.integers(0, vocab, args.p).tolist() for _ in range(args.requests)]
                wall, lat, use = level(port, prompts, args.n, c)
                gen = sum(u["completion_tokens"] for u in use)
                cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in use)
                rows.append([c, len(use), args.p, f"{gen / len(use):.1f}", f"{wall:.2f}", f"{len(use) / wall:.2f}",
                             f"{gen / wall:.1f}", f"{np.mean(lat):.3f}", f"{np.max(lat):.3f}", cached])
        finally:
            server.terminate()
            server.wait(30)
    print(f"model: {card['id']} (n_ctx {card['meta']['n_ctx']}); device {args.device}, server threads "
          f"{args.threads or 'all'}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(machine_line(args.device))
    head = ["clients", "requests", "prompt tok", "gen tok (mean)", "wall s", "req/s", "gen tok/s",
            "latency mean s", "latency max s", "cached tok"]
    print("\n| " + " | ".join(head) + " |")
    print("|" + "---:|" * len(head))
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")


if __name__ == "__main__":
    main()
