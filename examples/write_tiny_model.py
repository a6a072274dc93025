"""Write the built-in tiny gpt-oss GGUF (or one of your own sizes) and load it back.

    python examples/write_tiny_model.py                      # the cached default model
    python examples/write_tiny_model.py tiny.gguf --layers 2 --experts 32 --k 4
    python examples/write_tiny_model.py tiny.gguf --split 20 # parts of at most 20 tensors

Same keys, tensor names, types and layout as a real gpt-oss file (MXFP4 experts,
Q8_0 matrices, F32 norms/biases/router), small enough for tests and the simulator.
"""
import argparse

from hybrid.model import default_model_path, ensure_default_model, load, write_tiny

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("path", nargs="?", help=f"output file (default: {default_model_path()})")
ap.add_argument("--layers", type=int, default=4)
ap.add_argument("--embd", type=int, default=128, help="n_embd (multiple of 32)")
ap.add_argument("--ff", type=int, default=128, help="expert n_ff (multiple of 32)")
ap.add_argument("--experts", type=int, default=16)
ap.add_argument("--k", type=int, default=4, help="experts used per token")
ap.add_argument("--skew", type=float, default=1.5, help="router bias towards popular experts (0 = none)")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--split", type=int, default=0, help="max tensors per file (0: one file)")
args = ap.parse_args()

if args.path is None:
    path = ensure_default_model()
else:
    path = write_tiny(args.path, n_layers=args.layers, n_embd=args.embd, n_ff=args.ff,
                      n_experts=args.experts, k=args.k, skew=args.skew, seed=args.seed,
                      split_max_tensors=args.split)
print(f"wrote {path}\n")
print(load(path).describe())
