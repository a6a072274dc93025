"""Heatmap of the experts each MoE layer uses, ubatch by ubatch (what ``hybrid usage --plot`` draws).

    python examples/plot_usage.py                         # tiny model, synthetic prompt -> usage.png
    python examples/plot_usage.py -m gpt-oss-120b-mxfp4-00001-of-00003.gguf -ub 512 -o 120b.png

Needs matplotlib (``pip install 'hybrid-moe[plot]'``). Routing only: the
experts are not run, so any model size is quick. Hidden states are synthetic
(see ``hybrid.moe.traffic.synthetic_hidden``) unless ``--hidden`` gives real ones.
"""
import argparse

import numpy as np

from hybrid.moe.traffic import synthetic_hidden, usage_counts
from hybrid.report import ReportError, save_heatmap
from hybrid.model import ensure_default_model, load

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("-m", "--model", help="GGUF file (default: the built-in tiny gpt-oss)")
ap.add_argument("-p", type=int, default=2048, help="prompt tokens")
ap.add_argument("-ub", type=int, default=256, help="ubatch size")
ap.add_argument("--hidden", help=".npy hidden states [n_tokens, n_embd] (default: synthetic)")
ap.add_argument("-o", "--out", default="usage.png")
args = ap.parse_args()

model = load(args.model or ensure_default_model())
if args.hidden:
    x = np.ascontiguousarray(np.load(args.hidden), dtype=np.float32)[:args.p]
else:
    x = synthetic_hidden(args.p, model.n_embd)
counts = usage_counts(model.layers, x, args.ub)  # [layers, ubatches]
print(f"{model}: {x.shape[0]} tokens, ubatch {args.ub}")
print(f"experts used per layer: mean {counts.mean():.1f}, min {counts.min()}, max {counts.max()} "
      f"of {model.n_experts}")
name = model.metadata.get("general.name") or model.path.name
try:
    path = save_heatmap(counts, model.n_experts, args.out, f"{name}: experts used per ubatch of {args.ub}",
                        [L.index for L in model.layers])
except ReportError as e:  # matplotlib missing, or the file cannot be written
    raise SystemExit(f"error: {e}")
print(f"wrote {path}")
