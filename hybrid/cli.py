"""The command line: ``python -m hybrid {info,run,bench,usage,doctor,serve}`` (also ``hybrid-moe``).

Flags follow llama.cpp where they mean the same: ``-m`` model, ``-p`` prompt
tokens, ``-n`` tokens to generate, ``-c`` context, ``-b``/``-ub`` batch and
ubatch size. Without ``-m`` every command uses the built-in tiny gpt-oss model.
``run`` and ``bench`` run the whole model (text, ``--tokens`` or ``-p`` random
ids through every block); with ``--moe-only`` (or ``--hidden``) they feed the
MoE layers alone with the same hidden states, read from ``--hidden`` or made up
(synthetic), for kernel benchmarks. User errors (missing or bad files, bad
numbers) end with one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import stat
import sys
import time
from pathlib import Path

import numpy as np

from .bench import VARIANTS, compare_moe_only, compare_whole_model, default_variants, run_prompt, warm_up, warm_up_model
from .model import GGUFError, ensure_default_model, load
from .model.kvcache import physical_memory
from .moe.copyplan import LAYOUTS
from .moe.scheduler import DEVICES, MIN_OFFLOAD_BATCH, POLICIES
from .moe.transfer import HOST_MODES
from .moe.traffic import synthetic_hidden, ubatches, usage_counts
from .report import ReportError, bench_table, heatmap_path, machine_line, save_heatmap, usage_report

MAX_TOKENS = 1 << 20  # a sanity bound on -p, -n of bench and prompts: hidden states are held in RAM
MAX_PROMPT_BYTES = 16 * MAX_TOKENS  # a prompt file larger than this is refused before it is read
CPU_NOTE = ("no GPU: the experts run on the CPU and copies are only planned and counted; "
            "times are CPU times")
SIM_NOTE = "numba-cuda simulator: results and copy counts are real, times are not"
DEMO_PROMPT = ("Why is the sky blue? Light from the sun holds every colour, and the air scatters the short "
               "wavelengths more than the long ones. At sunset the light travels through more air, so")
RANDOM_NOTE = "its weights are random: the text below is noise, it shows that every layer runs"


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def check_tokens_bound(what: str, n: int):
    """A CLIError when ``what`` (-p N, -n N, a prompt) holds more than MAX_TOKENS tokens."""
    if n > MAX_TOKENS:
        raise CLIError(f"{what}: {n:,} tokens, more than {MAX_TOKENS:,}")


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


def _float_type(lo, hi=None, lo_open=False):
    def parse(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
        if not np.isfinite(v) or v < lo or (lo_open and v == lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{s} must be a finite number in {'(' if lo_open else '['}{lo}, "
                                             + ("inf)" if hi is None else f"{hi}]"))
        return v
    return parse


def _token_list(s):
    try:
        ids = [int(p) for p in s.replace(" ", "").split(",") if p]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of token ids") from None
    if not ids:
        raise argparse.ArgumentTypeError("no token ids given")
    return ids


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
    sub = ap.add_subparsers(dest="command", required=True, metavar="{info,run,bench,usage,doctor,serve}")
    pos, nonneg = _int_type(1), _int_type(0)

    def common(p, p_default, ub_default, ub_type=pos, ub_help="ubatch size (tokens)"):
        p.add_argument("-m", "--model", help="GGUF file, or the first part of a split model "
                       "(default: the built-in tiny gpt-oss)")
        p.add_argument("-p", "--n-prompt", type=pos, default=None,
                       help=f"prompt tokens: random ids through the whole model, synthetic hidden states "
                            f"with --moe-only (default {p_default}; with --hidden: the file's tokens)")
        p.add_argument("-ub", "--ubatch-size", type=ub_type, default=ub_default,
                       help=ub_help if ub_default is None else f"{ub_help} (default {ub_default})")
        p.add_argument("--hidden", metavar="FILE.npy", help="hidden states, float [n_tokens, n_embd] "
                       "(default: synthetic)")
        p.add_argument("--seed", type=nonneg, default=0,
                       help="seed of the random prompt ids, synthetic hidden states and sampling")
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
        p.add_argument("-t", "--threads", type=pos, default=None,
                       help="CPU threads of the Numba kernels (default: all cores); BLAS gets one")

    p = sub.add_parser("info", help="architecture, layers, experts, types, sizes")
    p.add_argument("-m", "--model", help="GGUF file (default: the built-in tiny gpt-oss)")
    p.add_argument("--per-layer", action="store_true", help="list every expert tensor")
    check_tensors(p)

    def whole(p):
        p.add_argument("--moe-only", action="store_true", help="feed the MoE layers alone with synthetic "
                       "(or --hidden) hidden states: the kernel benchmark mode")
        p.add_argument("-b", "--batch-size", type=pos, default=2048, help="logical batch (default 2048)")
        p.add_argument("--f32-decode", action="store_true", help="decode steps multiply MXFP4 experts with "
                       "float32 activations (default: int8 blocks, as llama.cpp does; prompts always float32)")
        p.add_argument("-r", "--repetitions", type=pos, default=1, help="bench: runs of each test (default 1)"
                       if p.prog.endswith("bench") else argparse.SUPPRESS)

    p = sub.add_parser("run", help="a prompt through the whole model, then generation (or --moe-only)")
    common(p, "text; --moe-only: 2048", 512)
    device(p)
    whole(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help=f"prompt text (default: {DEMO_PROMPT[:30]!r}...)")
    src.add_argument("-f", "--file", help="read the prompt text from a file")
    src.add_argument("--tokens", type=_token_list, help="prompt as token ids, comma-separated (no tokenizer)")
    p.add_argument("-n", "--n-predict", type=nonneg, default=32, help="tokens to generate (default 32; 0: "
                   "prompt processing only)")
    p.add_argument("-c", "--ctx-size", type=nonneg, default=0, help="context size (default: prompt + -n)")
    p.add_argument("--temp", type=_float_type(0.0), default=0.0, help="temperature (default 0: greedy)")
    p.add_argument("--top-p", type=_float_type(0.0, 1.0, lo_open=True), default=1.0, help="nucleus sampling")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the file's chat template")
    p.add_argument("--logits-out", metavar="FILE.npy", help="save the prompt's logits, float32 "
                   "[n_tokens, n_vocab]")
    p.add_argument("--policy", default="used", choices=POLICIES,
                   help="copy every expert (llama.cpp before PR #15346) or only the used ones")
    p.add_argument("--layout", default="natural", choices=LAYOUTS,
                   help="device slot = expert id (natural) or packed slots (compact)")
    p.add_argument("--cache-mb", type=_mb, default=0.0, help="VRAM cache for experts across ubatches (MiB)")
    p.add_argument("--device-mb", type=_mb, default=None, help="bound on the expert slots in VRAM (MiB)")
    p.add_argument("--no-overlap", action="store_true", help="copy everything, then compute")

    p = sub.add_parser("bench", help="llama-bench's table: pp<P> and tg<N> of the whole model, then PR #15346's "
                       "copy-all vs used-only comparison on a device (--moe-only: on the MoE layers alone)")
    common(p, "512 (--moe-only: 2048)", None, ub_type=_int_list,
           ub_help="ubatch sizes, comma-separated (default 512; --moe-only: 128,...,2048)")
    device(p)
    whole(p)
    p.add_argument("-n", "--n-gen", type=nonneg, default=128, help="tokens generated for tg<N> (default 128)")
    p.add_argument("--variants", type=_variant_list, default=None,
                   help=f"PR #15346's comparison: comma-separated, from {', '.join(VARIANTS)} (default, "
                        "whole model: all,used,used+overlap,used+cache on cuda/sim, none on the cpu; "
                        "--moe-only: all,used,used+overlap on a GPU, all,used otherwise)")
    p.add_argument("--cache-mb", type=_mb, default=0.0,
                   help="VRAM cache of used+cache (MiB; default: half of all the experts)")

    p = sub.add_parser("usage", help="experts used per layer and ubatch (routing only)")
    common(p, 2048, 512)
    p.add_argument("--plot", metavar="FILE.png", help="save a heatmap (needs matplotlib: pip install "
                   "'hybrid-moe[plot]')")
    p = sub.add_parser("doctor", help="GPU, driver, CUDA libraries, a pinned vs pageable copy; what to install")
    p.add_argument("--copy-mb", type=nonneg, default=256, help="size of the copy test (MiB; 0 skips it)")
    from . import serve
    serve.add_arguments(sub.add_parser("serve", help=serve.HELP))
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
    if n is not None:
        check_tokens_bound("-p", n)
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
    overflow float32 on these inputs), not from the command line: one line."""

    def __init__(self, what="these hidden states"):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if kind is not None and issubclass(kind, ValueError):
            raise CLIError(f"cannot run this model on {self.what}: {e}") from None
        return False


def _sim_tiles(device) -> dict:
    """On the simulator, small kernel tiles (results do not depend on them): every GPU thread
    is a Python thread there, and the built-in model takes minutes with a GPU's tiles."""
    if device != "sim":
        return {}
    from .model.tiny import simulator_tiles
    t = simulator_tiles()
    return dict(tiles=t.moe, dense_tiles=t.dense, attention_config=t.attention)


def make_backend(layers, args, **kw):
    from .moe.scheduler import HybridMoE
    sim = _sim_tiles(args.device)
    kw = {"tiles": sim.get("tiles"), "dense_tiles": sim.get("dense_tiles"), **kw}
    try:
        return HybridMoE(layers, device=args.device, host=args.host,
                         min_offload_batch=args.min_offload_batch, **kw)
    except (ValueError, RuntimeError) as e:  # bad combinations, no GPU, pinning refused
        raise CLIError(str(e)) from None


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
    print("\n" + whole_model_info(model))


def whole_model_info(model) -> str:
    """Attention, RoPE and tokenizer as the whole-model runner reads them, or why it cannot."""
    from .model.config import read_config
    from .model.tokenizer import Tokenizer
    try:
        c = read_config(model)
    except GGUFError as e:
        return f"whole model: not runnable here ({e})"
    swa = [i for i, s in enumerate(c.swa_layers) if s]
    rope = f"RoPE NEOX base {c.rope_freq_base:g} over {c.n_rot} dims"
    if c.ext_factor:
        rope += f", YaRN factor {1 / c.freq_scale:g} (original context {c.n_ctx_orig})"
    lines = [f"attention: {c.n_head} heads, {c.n_head_kv} KV heads, head_dim {c.head_dim}"
             + (", sinks" if c.sinks else "") + (", q/k norm" if c.qk_norm else "")
             + (f", sliding window {c.n_swa} on {len(swa)} of {c.n_layer} layers" if swa else ", full attention"),
             f"{rope}; context {c.n_ctx_train}; vocabulary {c.n_vocab}"]
    try:
        tok = Tokenizer.from_model(model)
        lines.append(f"tokenizer: byte-level BPE, pre-tokenizer {tok.pre!r}, {tok.n_vocab} tokens"
                     + (", chat template" if tok.chat_template else ""))
    except GGUFError as e:
        lines.append(f"tokenizer: none usable ({e}); run takes --tokens or -p N")
    return "\n".join(lines)


def cmd_run_moe(args):
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
        print(f"prompt: {x.shape[0]} tokens in {len(parts)} ubatch(es) of {ub}; policy {moe.policy}, "
              f"layout {moe.layout}, overlap {'on' if moe.overlap else 'off'}, " + _cache_note(args, moe))
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


def cmd_bench_moe(args):
    model = open_model(args.model, args.check_tensors)
    x, source = hidden_states(args, model.n_embd)
    n = x.shape[0]
    device = _device(args)
    variants = args.variants or default_variants(device, whole_model=False)
    sizes = [u for u in dict.fromkeys(args.ubatch_size) if u <= n]
    skipped = [u for u in args.ubatch_size if u > n]
    if not sizes:
        raise CLIError(f"every ubatch size ({', '.join(map(str, args.ubatch_size))}) exceeds -p {n}")
    print(_model_line(model))
    print(machine_line(device))
    print(f"device: {device}" + {"cpu": f" ({CPU_NOTE})", "sim": f" ({SIM_NOTE})"}.get(device, ""))
    print(source)
    if skipped:
        print(f"skipped ubatch sizes larger than the prompt: {', '.join(map(str, skipped))}")
    with _computing():
        c = compare_moe_only(model.layers, x, sizes, variants, cache_bytes=_cache_bytes(args),
                             make_moe=lambda **kw: make_backend(model.layers, args, **kw),
                             progress=not args.no_progress)
    print()
    _print_comparison(args, model, c)


def _device(args) -> str:
    from .moe.scheduler import resolve_device
    try:
        return resolve_device(args.device)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _cache_bytes(args):
    """used+cache's VRAM: --cache-mb, or None (the default: half the experts)."""
    return int(args.cache_mb * 2**20) or None


def _print_comparison(args, model, c):
    """PR #15346's table of a ``bench.Comparison``, with what its numbers mean off a GPU."""
    print(bench_table(model.metadata.get("general.name") or model.path.name, c.n_prompt, c.rows, c.variants,
                      c.device))
    if c.device != "cuda":
        print(f"\n{c.device} target: every variant computes the same experts "
              f"{'on the CPU' if c.device == 'cpu' else 'in the simulator'}, so t/s and speedup show no copy "
              "cost (noise only); MB and copies per token are what a GPU would move.")
    if "used+cache" in c.variants:
        asked = _cache_bytes(args)
        print(f"\nused+cache: {c.cache_bytes / 2**20:.1f} MiB of VRAM cache"
              + (f" (--cache-mb {args.cache_mb:g} capped: every expert of every layer fits)"
                 if asked and c.cache_bytes < asked else " (half the experts; --cache-mb sets it)"
                 if not asked else ""))


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


# ------------------------------------------------------------------ the whole model

def _moe_only(args) -> bool:
    """The MoE layers alone on synthetic or given hidden states: asked for, or implied by
    the option only that mode has (--hidden)."""
    return args.moe_only or bool(args.hidden)


def cmd_run(args):
    if _moe_only(args):
        args.p_default = 2048
        return cmd_run_moe(args)
    text_given = args.prompt is not None or args.file is not None
    if args.chat and (args.tokens is not None or (args.n_prompt is not None and not text_given)):
        raise CLIError("--chat wraps a text prompt (--prompt, -f) in the chat template; it does not apply to "
                       "token ids (--tokens, -p)")
    logits_out = None if args.logits_out is None else logits_path(args.logits_out)  # a bad path fails now
    model = open_model(args.model, args.check_tensors)
    tok = _tokenizer(model, needed=args.tokens is None and args.n_prompt is None)
    prompt, source = _prompt_tokens(args, model, tok)
    n_ctx = args.ctx_size or len(prompt) + args.n_predict
    if len(prompt) > n_ctx:  # before the warm-up: it would fail after it
        raise CLIError(f"{len(prompt)} prompt tokens exceed the context of {n_ctx} tokens (raise -c)")
    if logits_out:
        need = len(prompt) * _n_vocab(model) * 4
        ram = physical_memory()
        if ram is not None and need > ram:
            raise CLIError(f"--logits-out: the logits of {len(prompt):,} prompt tokens take {need / 2**30:.1f} GiB "
                           f"({need:,} bytes), more than this machine's {ram / 2**30:.1f} GiB of memory")
        args.logits_out = str(logits_out)
    tr = run_transformer(model, args, n_ctx)
    with tr.moe, _computing("this prompt"):
        _run_whole(args, model, tok, prompt, source, tr)


def run_transformer(model, args, n_ctx):
    """The Transformer ``run``'s flags describe (``serve`` builds its model with it too)."""
    return _transformer(model, args, n_ctx, args.ubatch_size, policy=args.policy, layout=args.layout,
                        cache_bytes=int(args.cache_mb * 2**20), overlap=not args.no_overlap,
                        device_bytes=None if args.device_mb is None else int(args.device_mb * 2**20))


def _cache_note(args, moe) -> str:
    capped = args.cache_mb and moe.cache_bytes < int(args.cache_mb * 2**20)
    return (f"cache {moe.cache_bytes / 2**20:g} MiB"
            + (f" (--cache-mb {args.cache_mb:g} capped: every expert of every layer fits)" if capped else ""))


def _run_whole(args, model, tok, prompt, source, tr):
    from .model.generate import generate
    print(_model_line(model))
    print(describe_device(tr.moe))
    print(f"prompt: {len(prompt)} tokens ({source}); context {tr.n_ctx}, batch {tr.n_batch}, "
          f"ubatch {tr.n_ubatch}; policy {tr.moe.policy}, layout {tr.moe.layout}, " + _cache_note(args, tr.moe))
    t_warm = warm_up_model(tr)
    out_text = []

    def show(t):  # stream the text; a token that ends inside a UTF-8 character waits for the next
        if tok is None:
            print(t, end=" ", flush=True)
            return
        out_text.append(t)
        text = tok.decode(out_text)
        if not text.endswith("\ufffd"):
            print(text, end="", flush=True)
            out_text.clear()

    if args.n_predict:
        how = "greedy" if args.temp == 0 else f"temp {args.temp}, top-p {args.top_p}, seed {args.seed}"
        print(f"\ngenerated ({how}"
              + (f"; {model.metadata.get('general.name')}: {RANDOM_NOTE}" if _is_builtin(model) else "") + "):")
    try:
        g = generate(tr, prompt, args.n_predict, temp=args.temp, top_p=args.top_p, seed=args.seed,
                     stop=tok.stop if tok else (), on_token=show, all_logits=bool(args.logits_out),
                     progress=not args.no_progress)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if out_text:  # the last tokens ended inside a character (or in bytes that never make one)
        print(tok.decode(out_text), end="")
    if args.n_predict:
        print(f"\n[{len(g.tokens)} tokens, stopped: {g.stopped}]")
    if args.logits_out:
        try:
            np.save(args.logits_out, g.prompt_logits.astype(np.float32))
        except OSError as e:
            raise CLIError(f"cannot write {args.logits_out}: {e.strerror or e}") from None
    _summary(tr, g, t_warm, args.logits_out)


def logits_path(path) -> Path:
    """The file ``--logits-out`` writes (``.npy`` added as np.save adds it), checked before
    any work is done: a folder, a missing folder or one that cannot be written is a CLIError."""
    if not str(path).strip():
        raise CLIError("--logits-out: empty file name")
    path = Path(path)
    if path.suffix != ".npy":
        path = path.with_name(path.name + ".npy")
    if path.is_dir():
        raise CLIError(f"--logits-out: {path} is a directory: give a file name, e.g. {path / 'logits.npy'}")
    existed = path.exists()
    try:  # opened, not truncated: what np.save will need; a file made here only for the test goes again
        with open(path, "ab"):
            pass
        if not existed:
            path.unlink()
    except OSError as e:
        raise CLIError(f"--logits-out: cannot write {path}: {e.strerror or e}") from None
    return path


def _read_prompt_file(path) -> str:
    """A prompt file's text: a regular file (not a pipe or device, which may never end) of
    at most MAX_PROMPT_BYTES, in UTF-8."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # before open: opening a FIFO waits for a writer
            raise CLIError(f"cannot read {path}: not a regular file")
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_size > MAX_PROMPT_BYTES:
                raise CLIError(f"{path}: {st.st_size:,} bytes, more than the {MAX_PROMPT_BYTES:,} bytes "
                               "a prompt may hold")
            data = f.read(MAX_PROMPT_BYTES + 1)
    except FileNotFoundError:
        raise CLIError(f"prompt file not found: {path}") from None
    except OSError as e:
        raise CLIError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > MAX_PROMPT_BYTES:  # grew while we read it
        raise CLIError(f"{path}: more than the {MAX_PROMPT_BYTES:,} bytes a prompt may hold")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CLIError(f"cannot read {path}: not UTF-8 text ({e})") from None


def _is_builtin(model) -> bool:
    return str(model.metadata.get("general.name", "")).startswith("tiny-")


def _tokenizer(model, needed: bool):
    from .model.tokenizer import Tokenizer
    try:
        return Tokenizer.from_model(model)
    except GGUFError as e:
        if needed:
            raise CLIError(f"bad model: {e}") from None
        return None


def _n_vocab(model) -> int:
    """The whole model's vocabulary (token_embd's rows), or a CLIError saying why it cannot run."""
    from .model.config import read_config
    try:
        return read_config(model).n_vocab
    except GGUFError as e:
        raise CLIError(f"bad model: {e}") from None


def _prompt_tokens(args, model, tok):
    """The prompt as token ids and a few words on where it came from."""
    n_vocab = _n_vocab(model)
    if args.tokens is not None:
        bad = [t for t in args.tokens if not 0 <= t < n_vocab]
        if bad:
            raise CLIError(f"--tokens: id {bad[0]} is outside the vocabulary [0, {n_vocab})")
        check_tokens_bound("--tokens", len(args.tokens))
        return list(args.tokens), "--tokens"
    text = _read_prompt_file(args.file) if args.file else args.prompt
    if text is None and args.n_prompt is not None:  # llama-bench style: random ids
        check_tokens_bound("-p", args.n_prompt)
        rng = np.random.default_rng(args.seed)
        return rng.integers(0, n_vocab, args.n_prompt).tolist(), f"{args.n_prompt} random token ids, seed {args.seed}"
    if tok is None:
        raise CLIError("the model has no tokenizer: give --tokens or -p N")
    if text is None:
        text = DEMO_PROMPT
    if args.chat:
        try:
            text = tok.chat(text)
        except ValueError as e:
            raise CLIError(str(e)) from None
    # A template that writes the BOS token itself must not get a second one.
    bos_text = tok.tokens[tok.bos] if tok.bos is not None else None
    try:
        ids = tok.encode(text, add_bos=False if args.chat and bos_text and text.startswith(bos_text) else None)
    except ValueError as e:
        raise CLIError(f"the prompt: {e}") from None
    if not ids:
        raise CLIError("the prompt is empty: no tokens to run")
    check_tokens_bound("the prompt", len(ids))
    shown = text if len(text) <= 80 else text[:77] + "..."
    return ids, f"text {shown!r}" + (", chat template" if args.chat else "")


def _transformer(model, args, n_ctx, ubatch, moe=None, **kw):
    """A Transformer over ``moe`` (default: a new backend from the flags and ``kw``)."""
    from .model.forward import Transformer
    moe = moe if moe is not None else make_backend(model.layers, args, **kw)
    try:
        sim = _sim_tiles(moe.device)
        return Transformer(model, moe, n_ctx=n_ctx, n_batch=args.batch_size, n_ubatch=ubatch,
                           q8_decode=not args.f32_decode, dense_tiles=sim.get("dense_tiles"),
                           attention_config=sim.get("attention_config"))
    except GGUFError as e:
        raise CLIError(f"bad model: {e}") from None
    except ValueError as e:
        raise CLIError(str(e)) from None


def _summary(tr, g, t_warm, logits_out=None):
    moe = tr.moe
    st = moe.stats
    prompt_ubs = list(range(len(tr.ubatch_bounds(g.prompt_tokens))))  # the reset numbered them from 0
    print()
    if prompt_ubs:
        offl = [u for u in prompt_ubs if any(r.path == "offload" for r in st.records if r.ubatch == u)]
        u = max(offl) if offl else prompt_ubs[-1]
        n_tok = next(r.n_tokens for r in st.records if r.ubatch == u)
        if not offl:
            how = f"CPU path: below {moe.min_offload_batch} tokens, nothing copied"
        else:
            how = "offload path, copies planned" if moe.device == "cpu" else "offloaded"
        print(f"experts used, prompt ubatch {u} ({n_tok} tokens, {how}):")
        print("\n".join(st.usage_lines(u)))
    t = st.totals()
    pp = g.prompt_tokens / g.t_prompt if g.t_prompt else 0.0
    print("\nsummary:")
    print(f"prompt: {g.prompt_tokens} tokens in {len(prompt_ubs)} ubatch(es), {g.t_prompt:.3f} s, "
          f"pp {pp:.1f} t/s" + (" (CPU times)" if moe.device == "cpu" else " (simulator: not a speed)"
                                 if moe.device == "sim" else ""))
    if g.n_decoded:
        print(f"generation: {len(g.tokens)} tokens, {g.n_decoded} decode steps in {g.t_gen:.3f} s, "
              f"tg {g.n_decoded / g.t_gen:.1f} t/s")
    if t_warm:
        print(f"warm-up (JIT compile) {t_warm:.2f} s not counted")
    print(f"layer-ubatches: {t['offloaded']} offloaded, {t['cpu']} on the CPU (< {moe.min_offload_batch} tokens)")
    print(f"copies: {t['copies']}, copied: {t['bytes'] / 1e6:.3f} MB ({t['bytes']:,} B)"
          + (f", cache hits: {t['hits']} experts" if moe.cache_bytes else "")
          + (" (planned, not made: no GPU)" if moe.device == "cpu" else ""))
    print(f"KV cache: {tr.cache.nbytes / 2**20:.2f} MiB for {tr.n_ctx} positions")
    if logits_out:
        print(f"prompt logits: {logits_out} (float32 [{g.prompt_tokens}, {tr.cfg.n_vocab}])")


def cmd_bench(args):
    if _moe_only(args):
        args.ubatch_size = args.ubatch_size or [128, 256, 512, 1024, 2048]
        args.p_default = 2048
        return cmd_bench_moe(args)
    model = open_model(args.model, args.check_tensors)
    n_vocab = _n_vocab(model)
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
    print(_model_line(model))
    rows = []
    # one backend: host memory is pinned once
    moe = make_backend(model.layers, args, policy="used", cache_bytes=int(args.cache_mb * 2**20))
    print(machine_line(moe.device))
    with moe, _computing("these token ids"):
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
    if _is_builtin(model):
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
    with _computing("these token ids"):
        c = compare_whole_model(model, prompt, sizes, variants, cache_bytes=_cache_bytes(args),
                                n_batch=args.batch_size, repetitions=args.repetitions,
                                make_moe=lambda **kw: make_backend(model.layers, args, **kw),
                                progress=not args.no_progress,
                                model_options={k: v for k, v in _sim_tiles(args.device).items() if k != "tiles"})
    print()
    _print_comparison(args, model, c)


def _bench_ubatch(args, model, moe, ub, prompt, gen, name, params) -> list[list[str]]:
    """llama-bench's pp<P> and tg<N> rows at ubatch ``ub``: each test ``-r`` times after a warm-up."""
    import numba
    n_p = len(prompt)
    tr = _transformer(model, args, n_p + args.n_gen, ub, moe=moe)
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


def cmd_doctor(args):
    from .doctor import diagnose, render
    d = diagnose(copy_mb=args.copy_mb)
    print("\n".join(render(d)))
    if not d.ready:
        raise SystemExit(1)


def cmd_serve(args):
    from . import serve
    return serve.main(args)


COMMANDS = {"info": cmd_info, "run": cmd_run, "bench": cmd_bench, "usage": cmd_usage, "doctor": cmd_doctor,
            "serve": cmd_serve}


def set_threads(n):
    """Numba kernels on ``n`` threads (None: all cores), numpy's BLAS on one.

    Both thread pools spin-wait after each parallel region; sharing the cores they
    slow each other down many times over (measured 10-30x on 2 cores), so the
    Numba kernels get the cores and the BLAS calls between them run on one thread.
    """
    import numba
    from threadpoolctl import threadpool_limits
    if n is not None:
        if n > numba.config.NUMBA_NUM_THREADS:
            raise CLIError(f"-t {n}: at most {numba.config.NUMBA_NUM_THREADS} threads (NUMBA_NUM_THREADS)")
        numba.set_num_threads(n)
    threadpool_limits(1, user_api="blas")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("run", "bench"):
            set_threads(args.threads)
        COMMANDS[args.command](args)
    except (CLIError, ReportError) as e:
        fail(str(e))
    except MemoryError as e:  # a model or prompt larger than this machine: one line, not a traceback
        fail(f"out of memory{': ' + str(e) if str(e) else ''}")
    return 0
