"""Run one MoE layer of a GGUF model with each copy policy, check they agree, print the statistics.

    python examples/run_layer.py                                  # the built-in tiny model
    python examples/run_layer.py -m gpt-oss-20b-mxfp4.gguf --layer 3 -n 512
    python examples/run_layer.py --hidden states.npy              # float [n_tokens, n_embd]

Hidden states are synthetic unless given (``hybrid.moe.traffic.synthetic_hidden``):
not the model's activations, but they route like any input does. ``--device auto`` uses a GPU when there is one,
else the CPU (copies are then planned and counted, not made).
"""
import argparse

import numpy as np

from hybrid.moe.traffic import synthetic_hidden
from hybrid.model import ensure_default_model, load
from hybrid.moe.reference import moe_reference
from hybrid.moe.scheduler import HybridMoE

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("-m", "--model", help="GGUF file (default: the built-in tiny gpt-oss)")
ap.add_argument("--layer", type=int, default=0, help="position in model.layers")
ap.add_argument("-n", "--tokens", type=int, default=64)
ap.add_argument("--hidden", help=".npy hidden states [n_tokens, n_embd]")
ap.add_argument("--device", default="auto", help="auto, cuda, sim (NUMBA_ENABLE_CUDASIM=1) or cpu")
ap.add_argument("--min-offload-batch", type=int, default=32, help="fewer tokens run on the CPU path")
args = ap.parse_args()

model = load(args.model or ensure_default_model())
layer = model.layers[args.layer]
if args.hidden:
    x = np.ascontiguousarray(np.load(args.hidden), dtype=np.float32)
else:
    x = synthetic_hidden(args.tokens, model.n_embd)
print(f"{model}\nlayer blk.{layer.index}, {x.shape[0]} tokens\n")

opts = dict(device=args.device, min_offload_batch=args.min_offload_batch)
with HybridMoE([layer], **opts) as moe:  # warm-up: JIT-compile outside the timed runs
    moe.forward(layer, x)
outs = {}
for policy in ("all", "used"):
    # Only this layer: the device holds one layer's experts.
    with HybridMoE([layer], policy=policy, **opts) as moe:
        outs[policy] = moe.forward(layer, x)
        moe.end_ubatch()
        t = moe.stats.totals()
        print(f"## policy {policy} on {moe.device} (host memory {moe.host_mode})")
        print("\n".join(moe.stats.usage_lines()))
        print(f"copies {t['copies']}, {t['bytes'] / 1e6:.3f} MB; times (s): "
              + ", ".join(f"{k} {v:.4f}" for k, v in t["times"].items()) + "\n")

# The policies change what is copied, never the result: same bits.
same = np.array_equal(outs["all"], outs["used"])
ref = moe_reference(layer, x)
err = np.abs(outs["used"] - ref).max() / np.abs(ref).max()
print(f"all == used bit for bit: {same}; max error vs the float64 reference: {err:.2e} (relative)")
if not same or err > 1e-4:
    raise SystemExit("policies disagree or the output is off the reference")
