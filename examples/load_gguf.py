"""Load a GGUF MoE model (memory-mapped) and print its hyper-parameters and per-layer tensors.

    python examples/load_gguf.py                                   # the built-in tiny model
    python examples/load_gguf.py gpt-oss-20b-mxfp4.gguf
    python examples/load_gguf.py model-00001-of-00003.gguf --all   # split files; every tensor

Expert weights stay in the file: loading costs only the header, whatever the model's size.
"""
import argparse
import time

import numpy as np

from hybrid.model import GGUFError, ensure_default_model, load
from hybrid.moe.reference import route_reference, router_logits_reference

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("path", nargs="?", help="GGUF file, or the first part of a split model")
ap.add_argument("--all", action="store_true", help="list every tensor, not only the experts")
args = ap.parse_args()

t0 = time.perf_counter()
try:
    model = load(args.path or ensure_default_model())
except GGUFError as e:
    raise SystemExit(f"error: {e}")
print(f"loaded in {time.perf_counter() - t0:.2f} s: {model}\n")
print(model.describe(per_layer=True))

if args.all:
    print("\n| tensor | type | ggml shape | bytes |\n|---|---|---|---:|")
    for t in model.tensors.values():
        print(f"| {t.name} | {t.type_name} | {list(t.ggml_shape)} | {t.nbytes} |")

# The first MoE layer's router, decoded from the file, routing a few random tokens.
layer = model.layers[0]
x = np.random.default_rng(0).standard_normal((64, model.n_embd)).astype(np.float32)
ids, _ = route_reference(router_logits_reference(layer, x), layer.k, layer.gating, layer.renormalize)
print(f"\nblk.{layer.index}: 64 random tokens use {len(np.unique(ids))}/{model.n_experts} experts")
