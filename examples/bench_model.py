"""The whole model at gpt-oss-20b layer shapes, ours beside llama.cpp's llama-bench on the same file.

The built-in tiny model measures per-call overhead; this one measures what a
real model's layers cost: n_embd = n_ff = 2880, 32 MXFP4 experts (k = 4), 64
query and 8 KV heads of 64, Q8_0 attention, with ``--layers`` blocks (24 in
gpt-oss-20b) and the tiny tokenizer's small vocabulary. Weights are random
bytes (speed does not depend on the values; MXFP4 exponents in the range real
experts use, routers skewed as ``synthetic_model``'s), written once to ``--out``:
llama-bench needs a file. The whole model at real shapes without a file, and its
PR #15346 comparison on a GPU: ``examples/gpu_check.py``.

Run:
    .venv/bin/python examples/bench_model.py --layers 4 -t 2 -p 512 -n 128 \
        [--llama-bench PATH/TO/llama-bench]
Both tools run in this one invocation, on the same file and thread count.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from gguf.constants import GGMLQuantizationType as T

from hybrid.cli import main as hybrid_main
from hybrid.model.gguf import load
from hybrid.model.synthetic import GPT_OSS, SHAPES, synthetic_layer
from hybrid.model.tiny import default_model_path, write_tiny

D, F, K = GPT_OSS["n_embd"], GPT_OSS["n_ff"], GPT_OSS["k"]
E = SHAPES["gpt-oss-20b"]["n_experts"]
N_HEAD, N_HEAD_KV, HEAD_DIM = GPT_OSS["n_head"], GPT_OSS["n_head_kv"], GPT_OSS["head_dim"]


def ensure_file(path: Path, n_layers: int) -> Path:
    if path.is_file():
        try:
            if len(load(path).layers) == n_layers:
                return path
        except ValueError:
            pass
    print(f"writing {path} ({n_layers} blocks at gpt-oss-20b shapes) ...", file=sys.stderr)
    layers = [synthetic_layer(i, n_embd=D, n_ff=F, n_experts=E, k=K, skew=SHAPES["gpt-oss-20b"]["skew"])
              for i in range(n_layers)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    write_tiny(tmp, n_layers=n_layers, n_embd=D, n_ff=F, n_experts=E, k=K, n_head=N_HEAD,
               n_head_kv=N_HEAD_KV, head_dim=HEAD_DIM, layers=layers, dense_type=T.Q8_0)
    os.replace(tmp, path)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count())
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-ub", default="512")
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("--llama-bench", type=Path, default=None, help="path to llama.cpp's llama-bench")
    args = ap.parse_args()
    path = args.out or default_model_path().with_name(f"gpt-oss-20b-shapes-{args.layers}L.gguf")
    path = ensure_file(path, args.layers)
    print(f"file: {path} ({path.stat().st_size / 2**30:.2f} GiB)\n")
    print("## ours: python -m hybrid bench")
    hybrid_main(["bench", "-m", str(path), "-p", str(args.p), "-n", str(args.n), "-ub", args.ub,
                 "-t", str(args.threads), "-r", str(args.r), "--no-progress"])
    if args.llama_bench:
        print("\n## llama.cpp: llama-bench")
        cmd = [str(args.llama_bench), "-m", str(path), "-p", str(args.p), "-n", str(args.n), "-ub", args.ub,
               "-t", str(args.threads), "-r", str(args.r)]
        print("$ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=False)


if __name__ == "__main__":
    main()
