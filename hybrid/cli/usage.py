"""``usage``: the experts used per MoE layer and ubatch (routing only), as a table and a heatmap."""
from __future__ import annotations

from ..moe.traffic import ubatches, usage_counts
from ..report import heatmap_path, save_heatmap
from .common import add_common, computing, hidden_states, model_line, open_model

HELP = "experts used per layer and ubatch (routing only)"


def add_arguments(p):
    add_common(p, 2048, 512)
    p.add_argument("--plot", metavar="FILE.png", help="save a heatmap (needs matplotlib: pip install "
                   "'hybrid-moe[plot]')")


def main(args):
    plot = heatmap_path(args.plot) if args.plot else None  # a bad path fails before the work
    model = open_model(args.model, args.check_tensors)
    x, source = hidden_states(args, model.n_embd)
    ub = min(args.ubatch_size, x.shape[0])
    with computing():
        counts = usage_counts(model.layers, x, ub)
    parts = ubatches(x.shape[0], ub)
    print(model_line(model))
    print(source)
    print(f"experts used (of {model.n_experts}) per MoE layer and ubatch of {ub} tokens, {x.shape[0]} tokens\n")
    print("| layer | " + " | ".join(f"ub{u}" for u in range(len(parts))) + " | mean |")
    print("|---:|" + "---:|" * (len(parts) + 1))
    for L, row in zip(model.layers, counts):
        print(f"| {L.index} | " + " | ".join(map(str, row)) + f" | {row.mean():.1f} |")
    if args.plot:
        title = f"{model.metadata.get('general.name') or model.path.name}: experts used, ubatch {ub}"
        path = save_heatmap(counts, model.n_experts, plot, title, [L.index for L in model.layers])
        print(f"\nheatmap: {path}")
