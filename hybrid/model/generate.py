"""Generation: prefill the prompt, then one token at a time (greedy, or temperature + top-p).

Decode steps are 1-token ubatches, so ``HybridMoE`` runs them on the CPU
expert path, as llama.cpp does below its offload batch size. Logits that hold
NaN or inf are an error (greedy decoding would pick token 0 from them, silently).
``generate`` holds the Transformer's lock for the whole generation: two threads
generating on one Transformer run one after the other (one KV cache, one sequence).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import numpy as np

__all__ = ["sample", "generate", "Generation"]


def sample(logits: np.ndarray, temp: float = 0.0, top_p: float = 1.0, rng=None) -> int:
    """Greedy when ``temp <= 0``; else softmax(logits / temp) cut to the smallest set of
    tokens whose probability reaches ``top_p`` (nucleus), renormalised, then one draw."""
    _check_sampling(temp, top_p)
    if temp <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64)
    with np.errstate(over="ignore"):  # max first: a tiny temp sends logits / temp to inf, and inf - inf is NaN
        p = np.exp((z - z.max()) / temp)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    cum = np.cumsum(p[order])
    keep = order[:int(np.searchsorted(cum, top_p)) + 1]
    q = p[keep] / p[keep].sum()
    rng = rng if rng is not None else np.random.default_rng()
    return int(keep[rng.choice(len(keep), p=q)])


def _check_sampling(temp, top_p):
    if isinstance(temp, bool) or not isinstance(temp, (int, float, np.floating, np.integer)) \
            or not (math.isfinite(temp) and temp >= 0):
        raise ValueError(f"temp must be a finite number >= 0, got {temp!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.floating, np.integer)) \
            or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def check_logits(logits: np.ndarray, where: str):
    """A ValueError when ``logits`` hold NaN or inf: the weights or activations overflowed."""
    if not np.isfinite(logits).all():
        bad = np.flatnonzero(~np.isfinite(logits.reshape(-1)))
        row = bad[0] // logits.shape[-1] if logits.ndim == 2 else None
        raise ValueError(f"the logits {where} hold NaN or inf ({bad.size} of {logits.size} values"
                         + (f", first in prompt token {row}" if row is not None else "")
                         + "): the model's weights or activations overflow; nothing sampled from them")


@dataclass
class Generation:
    prompt_tokens: int
    tokens: list = field(default_factory=list)  # generated ids (the stop token not included)
    stopped: str = ""  # "eos", "n", "context"
    t_prompt: float = 0.0  # seconds
    t_gen: float = 0.0
    n_decoded: int = 0  # decode steps (1-token forwards) timed in t_gen
    prompt_logits: np.ndarray | None = None  # [n_prompt, n_vocab] when asked for


def generate(model, prompt, n: int, *, temp: float = 0.0, top_p: float = 1.0, seed: int | None = None,
             stop=(), on_token=None, all_logits: bool = False, progress: bool = False) -> Generation:
    """Run ``prompt`` (token ids) through ``model`` (a ``Transformer``), then up to ``n`` tokens.

    Stops at a token in ``stop`` (EOS and friends), after ``n`` tokens, or when the
    context is full. ``on_token(id)`` is called for each generated token. Logits with
    NaN or inf are a ValueError.
    """
    if not callable(getattr(model, "prefill", None)) or not callable(getattr(model, "decode_one_token", None)):
        raise TypeError(f"generate takes a Transformer, got {type(model).__name__}")
    with getattr(model, "lock", None) or contextlib.nullcontext():
        return _generate(model, prompt, n, temp=temp, top_p=top_p, seed=seed, stop=stop, on_token=on_token,
                         all_logits=all_logits, progress=progress)


def _generate(model, prompt, n, *, temp, top_p, seed, stop, on_token, all_logits, progress) -> Generation:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    _check_sampling(temp, top_p)  # before the prompt runs, not at the first sample after it
    rng = np.random.default_rng(seed)
    stop = {int(s) for s in stop}
    t0 = time.perf_counter()
    logits = model.prefill(prompt, logits="all" if all_logits else "last", progress=progress)
    out = Generation(prompt_tokens=len(prompt), t_prompt=time.perf_counter() - t0,
                     prompt_logits=logits if all_logits else None)
    check_logits(logits, "of the prompt")
    last = logits[-1]
    t0 = time.perf_counter()
    while True:
        if len(out.tokens) >= n:
            out.stopped = "n"
            break
        tok = sample(last, temp, top_p, rng)
        if tok in stop:
            out.stopped = "eos"
            break
        out.tokens.append(tok)
        if on_token is not None:
            on_token(tok)
        if len(out.tokens) >= n:
            out.stopped = "n"
            break
        if model.n_past >= model.n_ctx:
            out.stopped = "context"
            break
        last = model.decode_one_token(tok)
        out.n_decoded += 1
        check_logits(last, f"after generated token {len(out.tokens)}")
    out.t_gen = time.perf_counter() - t0
    return out
