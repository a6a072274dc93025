"""What every command shares: the user-error type and its one-line exit, argument types
and argument groups, opening the model and the hidden states, the backend, the thread setting.

Parsing and printing only: what is computed lives in hybrid.bench, hybrid.model, hybrid.moe.
"""
from __future__ import annotations

import argparse
import os
import stat
import sys

import numpy as np

from ..bench import VARIANTS
from ..model import GGUFError, ensure_default_model, load
from ..moe.scheduler import DEVICES, MIN_OFFLOAD_BATCH
from ..moe.traffic import synthetic_hidden
from ..moe.transfer import HOST_MODES

MAX_TOKENS = 1 << 20  # a sanity bound on -p, -n of bench and prompts: hidden states are held in RAM
CPU_NOTE = ("no GPU: the experts run on the CPU and copies are only planned and counted; "
            "times are CPU times")
SIM_NOTE = "numba-cuda simulator: results and copy counts are real, times are not"


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

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, instead of usage + error
        fail(f"{message} (see {self.prog} --help)")


def checked_type(convert, ok, what, bad):
    """An argparse type: ``convert(s)`` (ValueError: "'s' is not ``what``"), kept if ``ok(v)``,
    else the message ``bad(v, s)``. One shape for every bounded number flag (serve's too)."""
    def parse(s):
        try:
            v = convert(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not {what}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(bad(v, s))
        return v
    return parse


def int_type(lo):
    return checked_type(int, lambda v: v >= lo, "an integer", lambda v, s: f"{v} must be >= {lo}")


mb_type = checked_type(float, lambda v: np.isfinite(v) and v >= 0, "a number",
                       lambda v, s: f"{s} must be a non-negative number of MiB")


def float_type(lo, hi=None, lo_open=False):
    def ok(v):
        return np.isfinite(v) and not (v < lo or (lo_open and v == lo) or (hi is not None and v > hi))
    return checked_type(float, ok, "a number",
                        lambda v, s: f"{s} must be a finite number in {'(' if lo_open else '['}{lo}, "
                        + ("inf)" if hi is None else f"{hi}]"))


def token_list(s):
    try:
        ids = [int(p) for p in s.replace(" ", "").split(",") if p]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of token ids") from None
    if not ids:
        raise argparse.ArgumentTypeError("no token ids given")
    return ids


def int_list(s):
    parts = [p for p in s.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of integers")
    return [int_type(1)(p.strip()) for p in parts]


def variant_list(s):
    names = [p.strip() for p in s.split(",") if p.strip()]
    bad = [n for n in names if n not in VARIANTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {', '.join(bad) or s!r}; "
                                         f"choose from {', '.join(VARIANTS)}")
    return list(dict.fromkeys(names))


# ------------------------------------------------------------------ argument groups

POS, NONNEG = int_type(1), int_type(0)


def add_check_tensors(p):
    p.add_argument("--check-tensors", action="store_true", help="scan every tensor's data at load "
                   "for NaN/inf and impossible MXFP4 scales (reads the whole file, as llama.cpp's flag)")


def add_common(p, p_default, ub_default, ub_type=POS, ub_help="ubatch size (tokens)"):
    """-m, -p, -ub, --hidden, --seed, --check-tensors: run, bench and usage."""
    p.add_argument("-m", "--model", help="GGUF file, or the first part of a split model "
                   "(default: the built-in tiny gpt-oss)")
    p.add_argument("-p", "--n-prompt", type=POS, default=None,
                   help=f"prompt tokens: random ids through the whole model, synthetic hidden states "
                        f"with --moe-only (default {p_default}; with --hidden: the file's tokens)")
    p.add_argument("-ub", "--ubatch-size", type=ub_type, default=ub_default,
                   help=ub_help if ub_default is None else f"{ub_help} (default {ub_default})")
    p.add_argument("--hidden", metavar="FILE.npy", help="hidden states, float [n_tokens, n_embd] "
                   "(default: synthetic)")
    p.add_argument("--seed", type=NONNEG, default=0,
                   help="seed of the random prompt ids, synthetic hidden states and sampling")
    add_check_tensors(p)
    p.set_defaults(p_default=p_default)


def add_device(p):
    """The target and its host memory: run and bench."""
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="auto: cuda when a GPU is present, else cpu (sim needs NUMBA_ENABLE_CUDASIM=1)")
    p.add_argument("--host", default="auto", choices=HOST_MODES,
                   help="host memory for the copies (auto: pinned, else staged)")
    p.add_argument("--min-offload-batch", type=NONNEG, default=MIN_OFFLOAD_BATCH,
                   help="smaller batches run on the CPU (llama.cpp: 32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-t", "--threads", type=POS, default=None,
                   help="CPU threads of the Numba kernels (default: all cores); BLAS gets one")


def add_whole(p):
    """The whole-model options: run and bench."""
    p.add_argument("--moe-only", action="store_true", help="feed the MoE layers alone with synthetic "
                   "(or --hidden) hidden states: the kernel benchmark mode")
    p.add_argument("-b", "--batch-size", type=POS, default=2048, help="logical batch (default 2048)")
    p.add_argument("--f32", "--f32-decode", dest="f32", action="store_true",
                   help="the experts multiply float32 activations in every call, so logits agree across "
                   "-ub splits to float32 rounding (default: experts with few tokens in a call, every "
                   "decode step's, multiply int8 blocks for MXFP4, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K to Q6_K, "
                   "Q8_0, IQ4_NL and IQ4_XS (the last three with VNNI), as "
                   "llama.cpp does for all)")
    p.add_argument("-r", "--repetitions", type=POS, default=1, help="bench: runs of each test (default 1)"
                   if p.prog.endswith("bench") else argparse.SUPPRESS)


# ------------------------------------------------------------------ inputs

def open_model(path, check_tensors=False):
    if path is not None and not str(path).strip():  # not the built-in model by accident
        raise CLIError("-m: empty file name (leave -m out for the built-in model)")
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
        if not stat.S_ISREG(os.stat(path).st_mode):  # before open: a FIFO would wait for a writer forever
            raise CLIError(f"{path}: not a regular file (a folder, device, FIFO or socket), not a .npy array")
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
    if args.hidden is not None and not args.hidden.strip():  # not synthetic states by accident
        raise CLIError("--hidden: empty file name")
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

class computing:
    """Around the compute: a ValueError there comes from the data (a router whose logits
    overflow float32 on these inputs), not from the command line: one line."""

    def __init__(self, what="these hidden states"):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if kind is not None and issubclass(kind, (ValueError, ArithmeticError)):
            raise CLIError(f"cannot run this model on {self.what}: {e}") from None
        return False


def sim_tiles(device) -> dict:
    """On the simulator, small kernel tiles (results do not depend on them): every GPU thread
    is a Python thread there, and the built-in model takes minutes with a GPU's tiles."""
    if device != "sim":
        return {}
    from ..model.tiny import simulator_tiles
    t = simulator_tiles()
    return dict(tiles=t.moe, dense_tiles=t.dense, attention_config=t.attention)


# The library's errors name its parameters; the command line's user knows the flags.
_FLAG_WORDS = [(r"device_bytes is ([\d,]+)", r"--device-mb gives \1 bytes"),
               (r"use layout='compact'", "use --layout compact"), (r"device='(\w+)'", r"--device \1"),
               (r"\(lower -c / n_ctx\)", "(lower -c)")]


def flag_words(msg: str, args=None) -> str:
    """``msg`` with the API's parameter names replaced by the flags that set them."""
    import re
    for pat, rep in _FLAG_WORDS:
        msg = re.sub(pat, rep, msg)
    if args is not None and not getattr(args, "ctx_size", 1):  # -c not given: the context is prompt + -n
        msg = msg.replace("(lower -c)", "(lower -n, or give a smaller -c)")
    return msg


def warn(msg: str):
    print(f"hybrid: warning: {msg}", file=sys.stderr)


def make_backend(layers, args, **kw):
    from ..moe.scheduler import HybridMoE
    sim = sim_tiles(args.device)
    kw = {"tiles": sim.get("tiles"), "dense_tiles": sim.get("dense_tiles"), **kw}
    try:
        moe = HybridMoE(layers, device=args.device, host=args.host,
                        min_offload_batch=args.min_offload_batch, **kw)
    except (ValueError, RuntimeError) as e:  # bad combinations, no GPU, pinning refused
        raise CLIError(flag_words(str(e), args)) from None
    if moe.device == "cpu" and args.host != "auto" and not getattr(args, "host_warned", False):
        args.host_warned = True  # bench makes a backend per variant: say it once
        warn(f"--host {args.host} has no effect on the cpu target: nothing is copied")
    return moe


def describe_device(moe, tr=None) -> str:
    """The device line; ``tr`` (a Transformer): also where its attention runs when not with the experts."""
    note = {"cpu": CPU_NOTE, "sim": SIM_NOTE}.get(moe.device)
    line = f"device: {moe.device}, host memory: {moe.host_mode}" + (f" ({note})" if note else "")
    if tr is not None and moe.device != "cpu" and not tr.on_device:
        line += (f"\nattention and dense weights: on the host ({tr.model.arch} has no device kernels for its "
                 "attention yet); the routed experts offload as above")
    return line


def model_line(model) -> str:
    return (f"model: {model.path} ({model.metadata.get('general.name') or model.arch}, {model.arch}, "
            f"{len(model.layers)} MoE layers, {model.n_experts} experts, k={model.k}, n_embd {model.n_embd})")


def moe_only(args) -> bool:
    """The MoE layers alone on synthetic or given hidden states: asked for, or implied by
    the option only that mode has (--hidden)."""
    return args.moe_only or args.hidden is not None


def is_builtin(model) -> bool:
    return str(model.metadata.get("general.name", "")).startswith("tiny-")


def open_tokenizer(model, needed: bool):
    from ..model.tokenizer import Tokenizer
    try:
        return Tokenizer.from_model(model)
    except GGUFError as e:
        if needed:
            raise CLIError(f"bad model: {e}") from None
        return None


def n_vocab_of(model) -> int:
    """The whole model's vocabulary (token_embd's rows), or a CLIError saying why it cannot run."""
    from ..model.config import read_config
    try:
        return read_config(model).n_vocab
    except GGUFError as e:
        raise CLIError(f"bad model: {e}") from None


def make_transformer(model, args, n_ctx, ubatch, moe=None, **kw):
    """A Transformer over ``moe`` (default: a new backend from the flags and ``kw``)."""
    from ..model.forward import Transformer
    moe = moe if moe is not None else make_backend(model.layers, args, **kw)
    try:
        sim = sim_tiles(moe.device)
        return Transformer(model, moe, n_ctx=n_ctx, n_batch=args.batch_size, n_ubatch=ubatch,
                           f32=args.f32, dense_tiles=sim.get("dense_tiles"),
                           attention_config=sim.get("attention_config"))
    except GGUFError as e:
        raise CLIError(f"bad model: {e}") from None
    except ValueError as e:
        raise CLIError(flag_words(str(e), args)) from None


def resolve_device_flag(args) -> str:
    from ..moe.scheduler import resolve_device
    try:
        return resolve_device(args.device)
    except ValueError as e:
        raise CLIError(str(e)) from None


def cache_bytes_of(args):
    """used+cache's VRAM: --cache-mb, or None (the default: half the experts)."""
    return int(args.cache_mb * 2**20) or None


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


