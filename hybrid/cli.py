"""The command line: ``python -m hybrid {info,run,bench,usage}`` (also ``hybrid-moe``).

Flags follow llama.cpp where they mean the same: ``-m`` model, ``-p`` prompt
tokens, ``-ub`` ubatch size. Without ``-m`` every command uses the built-in
tiny gpt-oss model. We run the MoE layers only, not attention: every MoE layer
sees the same hidden states, read from ``--hidden`` or made up (synthetic).
User errors (missing or bad files, bad numbers) end with one line on stderr
and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from .model import GGUFError, ensure_default_model, load
from .moe.copyplan import LAYOUTS, CostModel
from .moe.scheduler import DEVICES, MIN_OFFLOAD_BATCH, POLICIES
from .moe.transfer import HOST_MODES
from .moe.traffic import synthetic_hidden, ubatches, usage_counts
from .report import ReportError, bench_table, heatmap_path, save_heatmap, usage_report

MAX_TOKENS = 1 << 20  # a sanity bound on -p: hidden states are held in RAM
# Bench variants: what each column runs. "all" is llama.cpp before PR #15346,
# "used" the PR (copy, then compute), the rest go beyond it.
VARIANTS = {
    "all": dict(policy="all", overlap=False),
    "used": dict(policy="used", overlap=False),
    "used+overlap": dict(policy="used", overlap=True),
    "used+compact": dict(policy="used", layout="compact", overlap=True),
    "used+cache": dict(policy="used", overlap=True, cache=True),
    # A gap is copied when that costs less than one more copy: 10 us per copy at 25 GB/s (PCIe 4 x16).
    "used+merge": dict(policy="used", overlap=True, merge=CostModel(latency_s=10e-6, bandwidth_Bps=25e9)),
}
CPU_NOTE = ("no GPU: the experts run on the CPU and copies are only planned and counted; "
            "times are CPU times")
SIM_NOTE = "numba-cuda simulator: results and copy counts are real, times are not"


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def fail(msg: str):
    print(f"hybrid: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


# ------------------------------------------------------------------ arguments

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, instead of usage + error
        fail(f"{message} (see {self.prog} --help)")


def _int_type(lo):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{v} must be >= {lo}")
        return v
    return parse


def _mb(s):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not np.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"{s} must be a non-negative number of MiB")
    return v


def _int_list(s):
    parts = [p for p in s.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of integers")
    return [_int_type(1)(p.strip()) for p in parts]


def _variant_list(s):
    names = [p.strip() for p in s.split(",") if p.strip()]
    bad = [n for n in names if n not in VARIANTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {', '.join(bad) or s!r}; "
                                         f"choose from {', '.join(VARIANTS)}")
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="hybrid", description="MoE layers of GGUF models on a small GPU, experts in host RAM "
                 "(used-expert offload after llama.cpp PR #15346).")
    sub = ap.add_subparsers(dest="command", required=True, metavar="{info,run,bench,usage}")
    pos, nonneg = _int_type(1), _int_type(0)

    def common(p, p_default, ub_default, ub_type=pos, ub_help="ubatch size (tokens)"):
        p.add_argument("-m", "--model", help="GGUF file, or the first part of a split model "
                       "(default: the built-in tiny gpt-oss)")
        p.add_argument("-p", "--n-prompt", type=pos, default=None,
                       help=f"prompt tokens (default {p_default}; with --hidden: the file's tokens)")
        p.add_argument("-ub", "--ubatch-size", type=ub_type, default=ub_default,
                       help=f"{ub_help} (default {ub_default})")
        p.add_argument("--hidden", metavar="FILE.npy", help="hidden states, float [n_tokens, n_embd] "
                       "(default: synthetic)")
        p.add_argument("--seed", type=nonneg, default=0, help="seed of the synthetic hidden states")
        check_tensors(p)
        p.set_defaults(p_default=p_default)

    def check_tensors(p):
        p.add_argument("--check-tensors", action="store_true", help="scan every tensor's data at load "
                       "for NaN/inf and impossible MXFP4 scales (reads the whole file, as llama.cpp's flag)")

    def device(p):
        p.add_argument("--device", default="auto", choices=DEVICES,
                       help="auto: cuda when a GPU is present, else cpu (sim needs NUMBA_ENABLE_CUDASIM=1)")
        p.add_argument("--host", default="auto", choices=HOST_MODES,
                       help="host memory for the copies (auto: pinned, else staged)")
        p.add_argument("--min-offload-batch", type=nonneg, default=MIN_OFFLOAD_BATCH,
                       help="smaller batches run on the CPU (llama.cpp: 32)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("info", help="architecture, layers, experts, types, sizes")
    p.add_argument("-m", "--model", help="GGUF file (default: the built-in tiny gpt-oss)")
    p.add_argument("--per-layer", action="store_true", help="list every expert tensor")
    check_tensors(p)

    p = sub.add_parser("run", help="prompt processing through every MoE layer, ubatch by ubatch")
    common(p, 2048, 512)
    device(p)
    p.add_argument("--policy", default="used", choices=POLICIES,
                   help="copy every expert (llama.cpp before PR #15346) or only the used ones")
    p.add_argument("--layout", default="natural", choices=LAYOUTS,
                   help="device slot = expert id (natural) or packed slots (compact)")
    p.add_argument("--cache-mb", type=_mb, default=0.0, help="VRAM cache for experts across ubatches (MiB)")
    p.add_argument("--device-mb", type=_mb, default=None, help="bound on the expert slots in VRAM (MiB)")
    p.add_argument("--no-overlap", action="store_true", help="copy everything, then compute")

    p = sub.add_parser("bench", help="copy-all vs used-only (and more) on the same input, a markdown table")
    common(p, 2048, [128, 256, 512, 1024, 2048], ub_type=_int_list, ub_help="ubatch sizes, comma-separated")
    device(p)
    p.add_argument("--variants", type=_variant_list, default=None,
                   help=f"comma-separated, from {', '.join(VARIANTS)} (default: all,used,used+overlap "
                        "on a GPU, all,used otherwise)")
    p.add_argument("--cache-mb", type=_mb, default=0.0,
                   help="VRAM cache of used+cache (MiB; default: half of all the experts)")

    p = sub.add_parser("usage", help="experts used per layer and ubatch (routing only)")
    common(p, 2048, 512)
    p.add_argument("--plot", metavar="FILE.png", help="save a heatmap (needs matplotlib: pip install "
                   "'hybrid-moe[plot]')")
    return ap


# ------------------------------------------------------------------ inputs

def open_model(path, check_tensors=False):
    try:
        return load(path if path else ensure_default_model(), check_tensors=check_tensors)
    except FileNotFoundError as e:
        raise CLIError(str(e) if path else f"cannot write the built-in model: {e}") from None
    except GGUFError as e:
        raise CLIError(f"bad model: {e}") from None
    except OSError as e:  # unreadable file, or no room/permission to write the built-in model
        raise CLIError(f"cannot {'read ' + str(path) if path else 'write the built-in model'}: "
                       f"{e.strerror or e}") from None


def load_hidden(path, n_embd: int) -> np.ndarray:
    """Hidden states from a ``.npy`` file: a float array ``[n_tokens, n_embd]``, finite."""
    try:
        _check_npy_header(path, n_embd)
        x = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise CLIError(f"hidden-state file not found: {path}") from None
    except (OSError, ValueError, EOFError) as e:
        raise CLIError(f"{path}: not a readable .npy array ({e})") from None
    if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.floating):
        raise CLIError(f"{path}: hidden states must be a float array, got {getattr(x, 'dtype', type(x))}")
    if x.ndim != 2 or x.shape[1] != n_embd or x.shape[0] < 1:
        raise CLIError(f"{path}: hidden states must be [n_tokens, {n_embd}] (the model's n_embd), "
                       f"got shape {list(x.shape)}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise CLIError(f"{path}: hidden states hold NaN or inf (after conversion to float32)")
    return x


def _check_npy_header(path, n_embd):
    """Shape and size from the header, against the file's size: a header that promises
    more than the file holds must not make np.load allocate it."""
    fmt = np.lib.format
    with open(path, "rb") as f:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(f)
        else:
            raise CLIError(f"{path}: .npy format version {version[0]}.{version[1]} is not supported (1.0, 2.0)")
        have = os.fstat(f.fileno()).st_size - f.tell()
    if len(shape) != 2 or shape[1] != n_embd or shape[0] < 1:
        raise CLIError(f"{path}: hidden states must be [n_tokens, {n_embd}] (the model's n_embd), "
                       f"got shape {list(shape)}")
    need = shape[0] * shape[1] * dtype.itemsize  # Python ints: no overflow
    if need > have:
        raise CLIError(f"{path}: the header declares {list(shape)} {dtype} ({need:,} bytes of data), "
                       f"the file holds {have:,}: truncated or corrupt")


def hidden_states(args, n_embd) -> tuple[np.ndarray, str]:
    """The prompt's hidden states and a line saying where they come from."""
    n = args.n_prompt
    if n is not None and n > MAX_TOKENS:
        raise CLIError(f"-p {n} is more than {MAX_TOKENS} tokens")
    if args.hidden:
        x = load_hidden(args.hidden, n_embd)
        if n is not None:
            if n > x.shape[0]:
                raise CLIError(f"-p {n} but {args.hidden} holds {x.shape[0]} tokens")
            x = x[:n]
        return x, f"hidden states: {args.hidden} ({x.shape[0]} tokens)"
    n = n if n is not None else args.p_default
    return synthetic_hidden(n, n_embd, args.seed), (
        f"hidden states: SYNTHETIC (random, seed {args.seed}), not the model's own activations")


# ------------------------------------------------------------------ running

class _computing:
    """Around the compute: a ValueError there comes from the data (a router whose logits
    overflow float32 on these hidden states), not from the command line: one line."""

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if kind is not None and issubclass(kind, ValueError):
            raise CLIError(f"cannot run this model on these hidden states: {e}") from None
        return False


def make_backend(layers, args, **kw):
    from .moe.scheduler import HybridMoE
    try:
        return HybridMoE(layers, device=args.device, host=args.host,
                         min_offload_batch=args.min_offload_batch, **kw)
    except (ValueError, RuntimeError) as e:  # bad combinations, no GPU, pinning refused
        raise CLIError(str(e)) from None


def warm_up(moe, x, ub):
    """Compile the kernels (offload and CPU paths) outside the timed run, then forget it:
    no statistics, nothing resident. Returns the seconds it took."""
    t0 = time.perf_counter()
    if moe.device != "sim":  # simulator times mean nothing; spare the slow extra pass
        for part in (x[:ub], x[:1]):
            for i in range(len(moe.layers)):
                moe.forward(i, part, ubatch=-1)
    moe.reset()
    return 0.0 if moe.device == "sim" else time.perf_counter() - t0


def run_prompt(moe, x: np.ndarray, ub: int, progress: bool = False) -> float:
    """Every ubatch of ``x`` through every layer of ``moe``; returns the wall time (s)."""
    from tqdm import tqdm

    parts = ubatches(x.shape[0], ub)
    bar = tqdm(total=x.shape[0], unit="tok", file=sys.stderr, leave=False,
               disable=None if progress else True, desc="prompt")
    t0 = time.perf_counter()
    with bar:
        for u, (s, e) in enumerate(parts):
            for i in range(len(moe.layers)):
                moe.forward(i, x[s:e], ubatch=u)
            moe.end_ubatch()
            bar.update(e - s)
    return time.perf_counter() - t0


def describe_device(moe) -> str:
    note = {"cpu": CPU_NOTE, "sim": SIM_NOTE}.get(moe.device)
    return f"device: {moe.device}, host memory: {moe.host_mode}" + (f" ({note})" if note else "")


def _model_line(model) -> str:
    return (f"model: {model.path} ({model.metadata.get('general.name') or model.arch}, {model.arch}, "
            f"{len(model.layers)} MoE layers, {model.n_experts} experts, k={model.k}, n_embd {model.n_embd})")


# ------------------------------------------------------------------ commands

def cmd_info(args):
    model = open_model(args.model, args.check_tensors)
    per_ub = model.layers[0].expert_bytes * model.n_experts
    print(f"{model.path}\n")
    print(model.describe(per_layer=args.per_layer))
    print(f"\ncopy-all moves {per_ub / 1e6:.2f} MB of expert weights and biases per MoE layer and ubatch "
          f"({per_ub * len(model.layers) / 1e6:.2f} MB for all {len(model.layers)} layers)")


def cmd_run(args):
    model = open_model(args.model, args.check_tensors)
    x, source = hidden_states(args, model.n_embd)
    ub = min(args.ubatch_size, x.shape[0])
    mib = lambda v: None if v is None else int(v * 2**20)  # noqa: E731
    moe = make_backend(model.layers, args, policy=args.policy, layout=args.layout,
                       cache_bytes=mib(args.cache_mb), device_bytes=mib(args.device_mb),
                       overlap=not args.no_overlap)
    with moe:
        print(_model_line(model))
        print(describe_device(moe))
        print(source)
        print("the same hidden states feed every MoE layer: this runs the MoE layers, not attention")
        parts = ubatches(x.shape[0], ub)
        capped = args.cache_mb and moe.cache_bytes < int(args.cache_mb * 2**20)
        print(f"prompt: {x.shape[0]} tokens in {len(parts)} ubatch(es) of {ub}; policy {moe.policy}, "
              f"layout {moe.layout}, overlap {'on' if moe.overlap else 'off'}, "
              f"cache {moe.cache_bytes / 2**20:g} MiB"
              + (f" (--cache-mb {args.cache_mb:g} capped: every expert of every layer fits)" if capped else ""))
        with _computing():
            t_warm = warm_up(moe, x, ub)
            wall = run_prompt(moe, x, ub, progress=not args.no_progress)
        stats = moe.stats
    print()
    print("\n".join(usage_report(stats, parts)))
    t = stats.totals()
    n = x.shape[0]
    print("\nsummary:")
    print(f"tokens: {n}, time: {wall:.3f} s, {n / wall:.1f} t/s"
          + (" (CPU times)" if moe.device == "cpu" else " (simulator: not a speed)" if moe.device == "sim" else "")
          + (f"; warm-up (JIT compile) {t_warm:.2f} s not counted" if t_warm else ""))
    print(f"layer-ubatches: {t['offloaded']} offloaded, {t['cpu']} on the CPU (< {moe.min_offload_batch} tokens)")
    print(f"copies: {t['copies']} ({t['copies'] / n:.2f}/token), copied: {t['bytes'] / 1e6:.3f} MB "
          f"({t['bytes']:,} B, {t['bytes'] / n / 1e6:.4f} MB/token)"
          + (f", cache hits: {t['hits']} experts" if moe.cache_bytes else "")
          + (" (planned, not made: no GPU)" if moe.device == "cpu" else ""))
    steps = t["times"]
    print("time per step (s): " + ", ".join(f"{s} {v:.3f}" for s, v in steps.items()))


def cmd_bench(args):
    from .moe.scheduler import resolve_device
    model = open_model(args.model, args.check_tensors)
    x, source = hidden_states(args, model.n_embd)
    n = x.shape[0]
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise CLIError(str(e)) from None
    variants = args.variants or (["all", "used", "used+overlap"] if device == "cuda" else ["all", "used"])
    sizes = [u for u in dict.fromkeys(args.ubatch_size) if u <= n]
    skipped = [u for u in args.ubatch_size if u > n]
    if not sizes:
        raise CLIError(f"every ubatch size ({', '.join(map(str, args.ubatch_size))}) exceeds -p {n}")
    cache_bytes = int(args.cache_mb * 2**20) or model.expert_bytes // 2
    name = model.metadata.get("general.name") or model.path.name

    print(_model_line(model))
    print(f"device: {device}" + {"cpu": f" ({CPU_NOTE})", "sim": f" ({SIM_NOTE})"}.get(device, ""))
    print(source)
    if skipped:
        print(f"skipped ubatch sizes larger than the prompt: {', '.join(map(str, skipped))}")
    res = {ub: {} for ub in sizes}
    for v in variants:  # one backend per variant: host memory is pinned once, not per ubatch size
        kw = dict(VARIANTS[v])
        kw["cache_bytes"] = cache_bytes if kw.pop("cache", False) else 0
        with make_backend(model.layers, args, **kw) as moe:
            if kw["cache_bytes"]:
                used_cache = moe.cache_bytes  # capped at every expert of every layer
            for ub in sizes:
                with _computing():
                    warm_up(moe, x, ub)  # also resets: each size starts with a cold cache
                    wall = run_prompt(moe, x, ub, progress=not args.no_progress)
                t = moe.stats.totals()
                res[ub][v] = dict(tps=n / wall, mb=t["bytes"] / n / 1e6, copies=t["copies"] / n)
    rows = [(ub, res[ub]) for ub in sizes]
    print()
    print(bench_table(name, n, rows, variants, device))
    if device != "cuda":
        print(f"\n{device} target: every variant computes the same experts "
              f"{'on the CPU' if device == 'cpu' else 'in the simulator'}, so t/s and speedup show no copy "
              "cost (noise only); MB and copies per token are what a GPU would move.")
    if "used+cache" in variants:
        print(f"\nused+cache: {used_cache / 2**20:.1f} MiB of VRAM cache"
              + (f" (--cache-mb {args.cache_mb:g} capped: every expert of every layer fits)"
                 if used_cache < cache_bytes else ""))


def cmd_usage(args):
    plot = heatmap_path(args.plot) if args.plot else None  # a bad path fails before the work
    model = open_model(args.model, args.check_tensors)
    x, source = hidden_states(args, model.n_embd)
    ub = min(args.ubatch_size, x.shape[0])
    with _computing():
        counts = usage_counts(model.layers, x, ub)
    parts = ubatches(x.shape[0], ub)
    print(_model_line(model))
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


COMMANDS = {"info": cmd_info, "run": cmd_run, "bench": cmd_bench, "usage": cmd_usage}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (CLIError, ReportError) as e:
        fail(str(e))
    except MemoryError as e:  # a model or prompt larger than this machine: one line, not a traceback
        fail(f"out of memory{': ' + str(e) if str(e) else ''}")
    return 0
