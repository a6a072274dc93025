"""``run``: a prompt through the whole model, then generation; with ``--moe-only`` (or
``--hidden``) the MoE layers alone on given or synthetic hidden states."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np

from ..bench import run_prompt, warm_up, warm_up_model
from ..model.kvcache import physical_memory
from ..moe.copyplan import LAYOUTS
from ..moe.scheduler import POLICIES
from ..moe.traffic import ubatches
from ..report import usage_report
from .common import (MAX_TOKENS, NONNEG, CLIError, add_common, add_device, add_whole,
                     check_tokens_bound, computing, describe_device, float_type, hidden_states, is_builtin,
                     make_backend, make_transformer, mb_type, model_line, moe_only, n_vocab_of, open_model,
                     open_tokenizer, set_threads, token_list, warn)

HELP = "a prompt through the whole model, then generation (or --moe-only)"
MAX_PROMPT_BYTES = 16 * MAX_TOKENS  # a prompt file larger than this is refused before it is read
DEMO_PROMPT = ("Why is the sky blue? Light from the sun holds every colour, and the air scatters the short "
               "wavelengths more than the long ones. At sunset the light travels through more air, so")
RANDOM_NOTE = "its weights are random: the text below is noise, it shows that every layer runs"


def add_arguments(p):
    add_common(p, "text; --moe-only: 2048", 512)
    add_device(p)
    add_whole(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help=f"prompt text (default: {DEMO_PROMPT[:30]!r}...)")
    src.add_argument("-f", "--file", help="read the prompt text from a file")
    src.add_argument("--tokens", type=token_list, help="prompt as token ids, comma-separated (no tokenizer)")
    p.add_argument("-n", "--n-predict", type=NONNEG, default=32, help="tokens to generate (default 32; 0: "
                   "prompt processing only)")
    p.add_argument("-c", "--ctx-size", type=NONNEG, default=0, help="context size (default: prompt + -n)")
    p.add_argument("--temp", type=float_type(0.0), default=0.0, help="temperature (default 0: greedy)")
    p.add_argument("--top-p", type=float_type(0.0, 1.0, lo_open=True), default=1.0, help="nucleus sampling")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the file's chat template")
    p.add_argument("--special", action="store_true", help="parse control-token text (<|end|>...) in the prompt "
                   "as special tokens, as llama.cpp's parse_special (default: plain text)")
    p.add_argument("--logits-out", metavar="FILE.npy", help="save the prompt's logits, float32 "
                   "[n_tokens, n_vocab]")
    p.add_argument("--policy", default="used", choices=POLICIES,
                       help="copy every expert (llama.cpp before PR #15346) or only the used ones")
    p.add_argument("--layout", default="natural", choices=LAYOUTS,
                       help="device slot = expert id (natural) or packed slots (compact)")
    p.add_argument("--cache-mb", type=mb_type, default=0.0, help="VRAM cache for experts across ubatches (MiB)")
    p.add_argument("--device-mb", type=mb_type, default=None, help="bound on the expert slots in VRAM (MiB)")
    p.add_argument("--no-overlap", action="store_true", help="copy everything, then compute")


def main(args):
    set_threads(args.threads)
    refuse_ignored(args)
    if moe_only(args):
        args.p_default = 2048
        return run_moe(args)
    text_given = args.prompt is not None or args.file is not None
    if args.chat and (args.tokens is not None or (args.n_prompt is not None and not text_given)):
        raise CLIError("--chat wraps a text prompt (--prompt, -f) in the chat template; it does not apply to "
                       "token ids (--tokens, -p)")
    logits_out = None if args.logits_out is None else logits_path(args.logits_out)  # a bad path fails now
    model = open_model(args.model, args.check_tensors)
    tok = open_tokenizer(model, needed=args.tokens is None and args.n_prompt is None)
    prompt, source = _prompt_tokens(args, model, tok)
    n_ctx = args.ctx_size or len(prompt) + args.n_predict
    if len(prompt) > n_ctx:  # before the warm-up: it would fail after it
        raise CLIError(f"{len(prompt)} prompt tokens exceed the context of {n_ctx} tokens (raise -c)")
    if logits_out:
        need = len(prompt) * n_vocab_of(model) * 4
        ram = physical_memory()
        if ram is not None and need > ram:
            raise CLIError(f"--logits-out: the logits of {len(prompt):,} prompt tokens take {need / 2**30:.1f} GiB "
                           f"({need:,} bytes), more than this machine's {ram / 2**30:.1f} GiB of memory")
        args.logits_out = str(logits_out)
    tr = run_transformer(model, args, n_ctx)
    if tr.n_ctx > tr.cfg.n_ctx_train:  # as llama.cpp warns: positions past training are extrapolated
        warn(f"the context of {tr.n_ctx:,} tokens exceeds the {tr.cfg.n_ctx_train:,} the model was trained on")
    with tr.moe, computing("this prompt"):
        _run_whole(args, model, tok, prompt, source, tr)


def run_transformer(model, args, n_ctx):
    """The Transformer ``run``'s flags describe (``serve`` builds its model with it too)."""
    return make_transformer(model, args, n_ctx, args.ubatch_size, policy=args.policy, layout=args.layout,
                            cache_bytes=int(args.cache_mb * 2**20), overlap=not args.no_overlap,
                            device_bytes=None if args.device_mb is None else int(args.device_mb * 2**20))


def refuse_ignored(args):
    """Flags that the chosen mode would silently ignore are an error, not a surprise."""
    given = lambda *names: [n for n in names if getattr(args, _DEST[n]) not in (None, False)]  # noqa: E731
    if moe_only(args):
        why = "--hidden feeds the MoE layers alone" if args.hidden else "--moe-only runs the MoE layers alone"
        extra = given("--tokens", "--prompt", "-f", "--chat", "--special", "--logits-out")
        if extra:
            raise CLIError(f"{extra[0]} applies to the whole model; {why} (drop one of them)")
        return
    src = given("--tokens", "--prompt", "-f")
    if args.n_prompt is not None and src:
        raise CLIError(f"-p {args.n_prompt} makes a prompt of random ids; {src[0]} gives the prompt: give one")
    if args.special and (args.tokens is not None or args.n_prompt is not None):
        raise CLIError("--special parses a text prompt (--prompt, -f); it does not apply to token ids")


_DEST = {"--tokens": "tokens", "--prompt": "prompt", "-f": "file", "--chat": "chat", "--special": "special",
         "--logits-out": "logits_out"}


def _cache_note(args, moe) -> str:
    capped = args.cache_mb and moe.cache_bytes < int(args.cache_mb * 2**20)
    return (f"cache {moe.cache_bytes / 2**20:g} MiB"
            + (f" (--cache-mb {args.cache_mb:g} capped: every expert of every layer fits)" if capped else ""))


def _run_whole(args, model, tok, prompt, source, tr):
    from ..model.generate import generate
    print(model_line(model))
    print(describe_device(tr.moe, tr))
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
              + (f"; {model.metadata.get('general.name')}: {RANDOM_NOTE}" if is_builtin(model) else "") + "):")
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
        save_logits(args.logits_out, g.prompt_logits.astype(np.float32))
    _summary(tr, g, t_warm, args.logits_out)


def logits_path(path) -> Path:
    """The file ``--logits-out`` writes (``.npy`` added as np.save adds it), checked before any
    work without touching the filesystem: a folder, a missing or unwritable folder, a symbolic
    link or anything but a regular file (a FIFO, /dev/null) is a CLIError."""
    if not str(path).strip():
        raise CLIError("--logits-out: empty file name")
    given = Path(path)
    path = given if given.suffix == ".npy" else given.with_name(given.name + ".npy")
    for p in dict.fromkeys((given, path)):
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise CLIError(f"--logits-out: cannot write {p}: {e.strerror or e}") from None
        if stat.S_ISDIR(st.st_mode):
            raise CLIError(f"--logits-out: {p} is a directory: give a file name, e.g. {p / 'logits.npy'}")
        if stat.S_ISLNK(st.st_mode):
            raise CLIError(f"--logits-out: {p} is a symbolic link: give the path of a regular file")
        if not stat.S_ISREG(st.st_mode):
            raise CLIError(f"--logits-out: {p} is not a regular file (a device, FIFO or socket)")
    folder = path.parent
    if not folder.is_dir():
        raise CLIError(f"--logits-out: cannot write {path}: no folder {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CLIError(f"--logits-out: cannot write {path}: the folder is not writable")
    return path


def save_logits(path, logits):
    """Written to a temporary file in the same folder, then renamed: a reader never sees half a file,
    and an error leaves no file behind."""
    import tempfile
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)  # as np.save's open() would make it, not mkstemp's 0600
            with os.fdopen(fd, "wb") as f:
                np.save(f, logits)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        raise CLIError(f"cannot write {path}: {e.strerror or e}") from None


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


def _prompt_tokens(args, model, tok):
    """The prompt as token ids and a few words on where it came from."""
    n_vocab = n_vocab_of(model)
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
    try:  # control-token text in the user's words stays text unless --special
        if args.chat:  # (the template's own control tokens are parsed; a BOS it writes is not doubled)
            text, ids = tok.encode_chat(text, special=args.special)
        else:
            ids = tok.encode(text, special=args.special)
    except ValueError as e:
        raise CLIError(str(e) if args.chat else f"the prompt: {e}") from None
    if not ids:
        raise CLIError("the prompt is empty: no tokens to run")
    check_tokens_bound("the prompt", len(ids))
    shown = text if len(text) <= 80 else text[:77] + "..."
    return ids, f"text {shown!r}" + (", chat template" if args.chat else "")


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



def run_moe(args):
    model = open_model(args.model, args.check_tensors)
    x, source = hidden_states(args, model.n_embd)
    ub = min(args.ubatch_size, x.shape[0])
    mib = lambda v: None if v is None else int(v * 2**20)  # noqa: E731
    moe = make_backend(model.layers, args, policy=args.policy, layout=args.layout,
                       cache_bytes=mib(args.cache_mb), device_bytes=mib(args.device_mb),
                       overlap=not args.no_overlap)
    with moe:
        print(model_line(model))
        print(describe_device(moe))
        print(source)
        print("the same hidden states feed every MoE layer: this runs the MoE layers, not attention")
        parts = ubatches(x.shape[0], ub)
        print(f"prompt: {x.shape[0]} tokens in {len(parts)} ubatch(es) of {ub}; policy {moe.policy}, "
              f"layout {moe.layout}, overlap {'on' if moe.overlap else 'off'}, " + _cache_note(args, moe))
        with computing():
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
