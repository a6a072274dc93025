"""``bench``: llama-bench's table (pp<P>, tg<N>) of the whole model, then PR #15346's
copy-all vs used-only comparison; with ``--moe-only`` on the MoE layers alone."""
from __future__ import annotations

import time

import numpy as np

from ..bench import VARIANTS, compare_moe_only, compare_whole_model, default_variants, warm_up_model
from ..report import bench_table, machine_line
from .common import (CPU_NOTE, NONNEG, SIM_NOTE, CLIError, add_common, add_device, add_whole, cache_bytes_of,
                     check_tokens_bound, computing, hidden_states, int_list, is_builtin, make_backend,
                     make_transformer, mb_type, model_line, moe_only, n_vocab_of, open_model,
                     resolve_device_flag, set_threads, sim_tiles, variant_list)

HELP = ("llama-bench's table: pp<P> and tg<N> of the whole model, then PR #15346's "
        "copy-all vs used-only comparison on a device (--moe-only: on the MoE layers alone)")


def add_arguments(p):
    add_common(p, "512 (--moe-only: 2048)", None, ub_type=int_list,
               ub_help="ubatch sizes, comma-separated (default 512; --moe-only: 128,...,2048)")
    add_device(p)
    add_whole(p)
    p.add_argument("-n", "--n-gen", type=NONNEG, default=128, help="tokens generated for tg<N> (default 128)")
    p.add_argument("--variants", type=variant_list, default=None,
                   help=f"PR #15346's comparison: comma-separated, from {', '.join(VARIANTS)} (default, "
                        "whole model: all,used,used+overlap,used+cache on cuda/sim, none on the cpu; "
                        "--moe-only: all,used,used+overlap on a GPU, all,used otherwise)")
    p.add_argument("--cache-mb", type=mb_type, default=0.0,
                   help="VRAM cache of used+cache (MiB; default: half of all the experts)")


def main(args):
    set_threads(args.threads)
    if moe_only(args):
        args.ubatch_size = args.ubatch_size or [128, 256, 512, 1024, 2048]
        args.p_default = 2048
        return bench_moe(args)
    model = open_model(args.model, args.check_tensors)
    n_vocab = n_vocab_of(model)
    n_p = 512 if args.n_prompt is None else args.n_prompt
    check_tokens_bound("-p", n_p)
    check_tokens_bound("-n", args.n_gen)
    sizes = list(dict.fromkeys(args.ubatch_size or [512]))
    if all(u > n_p for u in sizes):
        raise CLIError(f"every ubatch size ({', '.join(map(str, sizes))}) exceeds -p {n_p}")
    rng = np.random.default_rng(args.seed)
    prompt = rng.integers(0, n_vocab, n_p)
    gen = rng.integers(0, n_vocab, max(args.n_gen, 1))
    params = sum(int(np.prod(t.shape)) for t in model.tensors.values())
    name = f"{model.metadata.get('general.name') or model.path.name} ({model.arch})"
    print(model_line(model))
    rows = []
    # one backend: host memory is pinned once
    moe = make_backend(model.layers, args, policy="used", cache_bytes=int(args.cache_mb * 2**20))
    print(machine_line(moe.device))
    with moe, computing("these token ids"):
        for ub in sizes:
            if ub > n_p:
                print(f"skipped ubatch size {ub}: larger than -p {n_p}")
                continue
            rows += _bench_ubatch(args, model, moe, ub, prompt, gen, name, params)
    head = ["model", "size", "params", "backend", "threads", "n_ubatch", "test", "t/s"]
    print()
    print("| " + " | ".join(head) + " |")
    print("| " + " | ".join(["---"] * 4 + ["---:"] * 4) + " |")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if is_builtin(model):
        print(f"\n{model.metadata.get('general.name')}: random weights; token ids drawn at random (seed {args.seed})")
    _bench_variants(args, model, moe.device, prompt, [u for u in sizes if u <= n_p])


def _bench_variants(args, model, device, prompt, sizes):
    """PR #15346's comparison on the whole model (after the llama-bench backend is closed:
    one backend pins the host memory at a time)."""
    variants = args.variants or default_variants(device, whole_model=True)
    print(f"\nPR #15346's comparison: pp{len(prompt)} of the whole model by copy policy, ubatch "
          f"{', '.join(map(str, sizes))}")
    if not variants:
        print("skipped on the cpu target: the experts run on the CPU whatever the policy, so the variants differ "
              "only in the copies they plan, not in time; run with --device cuda (or name --variants to see "
              "the planned MB and copies per token)")
        return
    with computing("these token ids"):
        c = compare_whole_model(model, prompt, sizes, variants, cache_bytes=cache_bytes_of(args),
                                n_batch=args.batch_size, repetitions=args.repetitions,
                                make_moe=lambda **kw: make_backend(model.layers, args, **kw),
                                progress=not args.no_progress,
                                model_options={k: v for k, v in sim_tiles(args.device).items() if k != "tiles"})
    print()
    _print_comparison(args, model, c)


def _bench_ubatch(args, model, moe, ub, prompt, gen, name, params) -> list[list[str]]:
    """llama-bench's pp<P> and tg<N> rows at ubatch ``ub``: each test ``-r`` times after a warm-up."""
    import numba
    n_p = len(prompt)
    tr = make_transformer(model, args, n_p + args.n_gen, ub, moe=moe)
    backend = {"cpu": "CPU", "sim": "CUDA-sim", "cuda": "CUDA"}[moe.device]
    warm_up_model(tr)
    pp, tg = [], []
    for _ in range(args.repetitions):
        t0 = time.perf_counter()
        tr.prefill(prompt, logits="last", progress=not args.no_progress)
        pp.append(n_p / (time.perf_counter() - t0))
        if args.n_gen:
            tr.reset()  # llama-bench's tg<N>: N single-token decodes from an empty context
            t0 = time.perf_counter()
            for tkn in gen[:args.n_gen]:
                tr.decode_one_token(int(tkn))
            tg.append(args.n_gen / (time.perf_counter() - t0))
    size = sum(t.nbytes for t in model.tensors.values())  # llama-bench's size: tensor data
    common = [name, f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.2f} MiB",
              f"{params / 1e9:.2f} B" if params >= 1e8 else f"{params / 1e6:.2f} M", backend,
              str(numba.get_num_threads()), str(ub)]
    return [common + [f"pp{n_p}", _tps(pp)]] + ([common + [f"tg{args.n_gen}", _tps(tg)]] if args.n_gen else [])


def _tps(v):
    v = np.asarray(v)
    return f"{v.mean():.2f} ± {v.std(ddof=1) if v.size > 1 else 0.0:.2f}"


def bench_moe(args):
    model = open_model(args.model, args.check_tensors)
    x, source = hidden_states(args, model.n_embd)
    n = x.shape[0]
    device = resolve_device_flag(args)
    variants = args.variants or default_variants(device, whole_model=False)
    sizes = [u for u in dict.fromkeys(args.ubatch_size) if u <= n]
    skipped = [u for u in args.ubatch_size if u > n]
    if not sizes:
        raise CLIError(f"every ubatch size ({', '.join(map(str, args.ubatch_size))}) exceeds -p {n}")
    print(model_line(model))
    print(machine_line(device))
    print(f"device: {device}" + {"cpu": f" ({CPU_NOTE})", "sim": f" ({SIM_NOTE})"}.get(device, ""))
    print(source)
    if skipped:
        print(f"skipped ubatch sizes larger than the prompt: {', '.join(map(str, skipped))}")
    with computing():
        c = compare_moe_only(model.layers, x, sizes, variants, cache_bytes=cache_bytes_of(args),
                             make_moe=lambda **kw: make_backend(model.layers, args, **kw),
                             progress=not args.no_progress)
    print()
    _print_comparison(args, model, c)


def _print_comparison(args, model, c):
    """PR #15346's table of a ``bench.Comparison``, with what its numbers mean off a GPU."""
    print(bench_table(model.metadata.get("general.name") or model.path.name, c.n_prompt, c.rows, c.variants,
                      c.device))
    if c.device != "cuda":
        print(f"\n{c.device} target: every variant computes the same experts "
              f"{'on the CPU' if c.device == 'cpu' else 'in the simulator'}, so t/s and speedup show no copy "
              "cost (noise only); MB and copies per token are what a GPU would move.")
    if "used+cache" in c.variants:
        asked = cache_bytes_of(args)
        print(f"\nused+cache: {c.cache_bytes / 2**20:.1f} MiB of VRAM cache"
              + (f" (--cache-mb {args.cache_mb:g} capped: every expert of every layer fits)"
                 if asked and c.cache_bytes < asked else " (half the experts; --cache-mb sets it)"
                 if not asked else ""))
