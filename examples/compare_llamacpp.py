"""Logits and token ids against llama.cpp on the same files: one GGUF file, or every architecture.

``compare_llamacpp.py --dump-logits BIN FILE``: a text prompt through llama.cpp and through
``Transformer`` on FILE, token for token. ``--all``: for each architecture (and each of its
``tiny["variants"]``) this writes a small random model
laid out as llama.cpp's converter lays it out, runs the same tokens through llama.cpp
(``examples/llamacpp/dump_logits.cpp``: float32 KV cache, no flash attention) and through
``Transformer`` (float32 activations, ``f32=True``), and prints the largest difference
relative to the largest logit, and how often the two argmaxes agree. With ``--tokenizer`` it
also encodes a multilingual text with each file's tokenizer here and in llama.cpp.

Build the llama.cpp side once (llama.cpp from the llama-cpp-python sdist, ``vendor/llama.cpp``,
built with cmake: ``cmake --build build --target llama``)::

    L=.../vendor/llama.cpp
    g++ -O2 -std=c++17 -I$L/include -I$L/ggml/include examples/llamacpp/dump_logits.cpp \\
        -o dump_logits -L$L/build/bin -lllama -lggml -lggml-base -Wl,-rpath,$L/build/bin

    python examples/compare_llamacpp.py --dump-logits ./dump_logits model.gguf [--tokens 300] [--ubatch 128]
    python examples/compare_llamacpp.py --dump-logits ./dump_logits --all [--type F32|Q8_0] [--tokenizer]

Weights F32 (the default) compare at float rounding; with Q8_0 matrices llama.cpp quantises
the activations to Q8_0 blocks for every product (its vec_dot_type), so differences are ~1e-2.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from gguf.constants import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybrid.model import arch as archs, load, write_tiny  # noqa: E402
from hybrid.model.forward import Transformer  # noqa: E402
from hybrid.model.tiny import TINY_PRE  # noqa: E402
from hybrid.model.tokenizer import PRE_TOKENIZERS, Tokenizer  # noqa: E402
from hybrid.report import machine_line  # noqa: E402

SHAPE = dict(n_layers=3, n_embd=128, n_ff=64, n_experts=8, k=2, n_vocab=400, n_head=4, n_head_kv=2, head_dim=32,
             n_swa=16)
PROMPT = ("Why is the sky blue? Light from the sun holds every colour, and the air scatters the short wavelengths "
          "more than the long ones. At sunset the light travels through more air, so the blue is scattered away. ")
TEXT = ("The sky is blue because air scatters light. Ünïcödé, naïve café 1234567 + 89 = ?\n"
        "  Mixture-of-experts 模型 把 token 送到 专家; 日本語のテキスト。 Привет, мир! 한국어 \t\tdone.\n")


def cases():
    """``(arch, variant)`` for every architecture tiny.py writes, each of its variants."""
    for name in archs.with_graph():
        if name in TINY_PRE:
            for v in archs.REGISTRY[name].tiny.get("variants") or (None,):
                yield name, v


def run_llama(exe, path, tokens, n_ubatch, threads, mode=None):
    with tempfile.TemporaryDirectory() as d:
        src, out = Path(d) / "in.txt", Path(d) / "out.bin"
        src.write_text(tokens if mode == "tokenize" else " ".join(map(str, tokens)), encoding="utf-8")
        cmd = [exe, str(path), str(src), str(out), str(n_ubatch), str(threads)] + ([mode] if mode else [])
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-400:]}")
        if mode == "tokenize":
            return [int(x) for x in out.read_text().split()]
        return np.fromfile(out, np.float32)


def one_file(a):
    """The prompt's logits here and in llama.cpp on ``a.file``."""
    model = load(a.file)
    ids = Tokenizer.from_model(model).encode(PROMPT * 20)[:a.tokens]
    ours = Transformer(model, n_ctx=max(16, len(ids)), n_ubatch=a.ubatch, f32=True).prefill(ids)
    theirs = run_llama(a.dump_logits, a.file, ids, a.ubatch, a.threads).reshape(ours.shape)
    d = np.abs(ours.astype(np.float64) - theirs)
    scale = np.abs(theirs).max()
    print(f"{a.file}: {len(ids)} tokens, ubatch {a.ubatch}, n_vocab {theirs.shape[1]}")
    print(f"max |ours - llama.cpp| = {d.max():.3g} ({d.max() / scale:.2g} of the largest logit {scale:.3g}); "
          f"greedy token agrees at {np.mean(ours.argmax(1) == theirs.argmax(1)) * 100:.1f}% of positions")
    return d.max() / scale


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dump-logits", default=os.environ.get("LLAMACPP_DUMP_LOGITS"), required=False,
                    help="the built examples/llamacpp/dump_logits (or $LLAMACPP_DUMP_LOGITS)")
    ap.add_argument("file", nargs="?", help="a GGUF file to compare on a text prompt")
    ap.add_argument("--all", action="store_true", help="every architecture and variant tiny.py writes")
    ap.add_argument("--type", default="F32", choices=("F32", "F16", "Q8_0"), help="dense and expert weight type")
    ap.add_argument("--tokens", type=int, default=None, help="prompt length (default: 300 for a file, 40 for --all)")
    ap.add_argument("--ubatch", type=int, default=None, help="ubatch size (default: 128 for a file, 16 for --all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokenizer", action="store_true", help="also compare token ids on a multilingual text")
    ap.add_argument("--out", default=None, help="folder for the model files (default: a temporary one)")
    a = ap.parse_args(argv)
    if not a.dump_logits or not Path(a.dump_logits).is_file():
        ap.error("needs --dump-logits PATH (build it as the module doc says)")
    if bool(a.file) == a.all:
        ap.error("give a FILE or --all")
    if a.file:
        a.tokens, a.ubatch = a.tokens or 300, a.ubatch or 128
        return one_file(a)
    a.tokens, a.ubatch = a.tokens or 40, a.ubatch or 16
    folder = Path(a.out or tempfile.mkdtemp(prefix="llamacpp-compare-"))
    folder.mkdir(parents=True, exist_ok=True)
    wtype = T[a.type]
    print(f"# {machine_line()}; weights {a.type}, {a.tokens} tokens, ubatch {a.ubatch}, {a.threads} threads")
    print("| architecture | variant | max abs diff / max logit | argmax agree | tokenizer (pre) |")
    print("|---|---|---:|---:|---|")
    worst = 0.0
    for name, variant in cases():
        spec = archs.REGISTRY[name]  # leading dense blocks and nextn blocks where the architecture has them
        path = write_tiny(folder / f"{name}-{variant or 'base'}-{a.type}.gguf", arch=name, seed=11, variant=variant,
                          dense_blocks=(0,) if spec.leading_dense else (), n_nextn=int(spec.nextn),
                          dense_type=wtype, expert_type=wtype, **SHAPE)
        m = load(path)
        toks = np.random.default_rng(5).integers(0, SHAPE["n_vocab"], a.tokens)
        ours = Transformer(m, n_ctx=a.tokens, n_ubatch=a.ubatch, f32=True).prefill(toks)
        ref = run_llama(a.dump_logits, path, toks.tolist(), a.ubatch, a.threads).reshape(ours.shape)
        rel = float(np.abs(ours - ref).max() / np.abs(ref).max())
        agree = float((ours.argmax(1) == ref.argmax(1)).mean())
        worst = max(worst, rel)
        tok = ""
        if a.tokenizer:
            here = Tokenizer.from_model(m).encode(TEXT)
            there = run_llama(a.dump_logits, path, TEXT, a.ubatch, a.threads, "tokenize")
            tok = f"{'same' if here == there else 'DIFFERENT'} ({TINY_PRE[name]}, {len(there)} ids)"
        print(f"| {name} | {variant or '-'} | {rel:.2e} | {agree:.2f} | {tok} |", flush=True)
    if a.tokenizer:  # every pre-tokenizer we name, each with a vocabulary trained through it
        print("\n| tokenizer.ggml.pre | ids here = llama.cpp's | ids |\n|---|---|---:|")
        for pre in PRE_TOKENIZERS:
            path = write_tiny(folder / f"tok-{pre}.gguf", pre=pre, **dict(SHAPE, n_layers=1))
            here = Tokenizer.from_model(load(path)).encode(TEXT)
            there = run_llama(a.dump_logits, path, TEXT, a.ubatch, a.threads, "tokenize")
            print(f"| {pre} | {'same' if here == there else 'DIFFERENT'} | {len(there)} |", flush=True)
        path = write_tiny(folder / "tok-spm.gguf", arch="llama", tokenizer="spm", **dict(SHAPE, n_layers=1))
        here = Tokenizer.from_model(load(path)).encode(TEXT)
        there = run_llama(a.dump_logits, path, TEXT, a.ubatch, a.threads, "tokenize")
        print(f"| (SentencePiece, model llama) | {'same' if here == there else 'DIFFERENT'} | {len(there)} |")
    return worst


if __name__ == "__main__":
    main()
