"""What ``bench`` measures: PR #15346's comparison of copy policies, for the whole model or the MoE layers alone.

A variant is one ``HybridMoE`` configuration (``VARIANTS``). ``compare_whole_model``
runs a prompt through ``Transformer`` with each variant at each ubatch size;
``compare_moe_only`` feeds the MoE layers alone. Both return a ``Comparison``, whose
rows ``report.bench_table`` prints: t/s, MB and copies per token. One backend per
variant, so host memory is pinned once per variant, never twice at a time. Nothing
here prints.

On the ``cpu`` target every variant computes the same experts on the CPU: the
variants differ only in the copies they plan (MB and copies per token), never in
time. The t/s comparison means something on a GPU only.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np

from .moe.copyplan import CostModel
from .moe.scheduler import HybridMoE, resolve_device
from .moe.traffic import ubatches

__all__ = ["VARIANTS", "PR_15346", "Comparison", "compare_whole_model", "compare_moe_only", "default_variants",
           "half_the_experts", "warm_up", "warm_up_model", "run_prompt"]

# What each column runs. "all" is llama.cpp before PR #15346, "used" the PR (copy, then
# compute), the rest go beyond it; "used+cache" is used + overlap + a VRAM cache.
VARIANTS = {
    "all": dict(policy="all", overlap=False),
    "used": dict(policy="used", overlap=False),
    "used+overlap": dict(policy="used", overlap=True),
    "used+compact": dict(policy="used", layout="compact", overlap=True),
    "used+cache": dict(policy="used", overlap=True, cache=True),
    # A gap is copied when that costs less than one more copy: 10 us per copy at 25 GB/s (PCIe 4 x16).
    "used+merge": dict(policy="used", overlap=True, merge=CostModel(latency_s=10e-6, bandwidth_Bps=25e9)),
}
# PR #15346's table: gpt-oss, -ot exps=CPU, pp2048, t/s before -> after, by ubatch.
PR_15346 = {
    "gpt-oss-20b": {128: (124.24, 202.92), 256: (253.18, 372.75), 512: (502.73, 685.31),
                    1024: (1015.20, 1178.50), 2048: (1629.92, 2089.53)},
    "gpt-oss-120b": {128: (22.37, 59.09), 256: (41.80, 99.83), 512: (87.93, 182.89),
                     1024: (168.17, 255.84), 2048: (345.01, 483.99)},
}


def default_variants(device: str, whole_model: bool) -> list[str]:
    """The variants run when none are named: on a device the whole model's four (the PR's two,
    then overlap and the cache); the MoE layers alone keep their shorter lists; the whole model
    on the cpu target none (its t/s could not differ)."""
    if whole_model:
        return ["all", "used", "used+overlap", "used+cache"] if device != "cpu" else []
    return ["all", "used", "used+overlap"] if device == "cuda" else ["all", "used"]


def half_the_experts(layers) -> int:
    """The default VRAM cache of ``used+cache``: half the bytes of every expert (weights and biases)."""
    return sum(L.n_experts * L.expert_bytes for L in layers) // 2


@dataclass
class Comparison:
    """Rows for ``report.bench_table``: ``(ubatch, {variant: {"tps", "mb", "copies"}})``."""

    device: str  # the target the backends ran on
    n_prompt: int
    variants: list
    rows: list
    cache_bytes: int = 0  # the VRAM cache used+cache ran with (capped at every expert), 0 if not run


def compare(make_moe, variants, sizes, measure, n_tokens: int, cache_bytes: int) -> Comparison:
    """Each variant's backend from ``make_moe(**options)``, then ``measure(moe, ubatch)`` -> seconds
    for ``n_tokens`` at each size; MB and copies per token from the backend's statistics."""
    _check_variants(variants)
    res = {ub: {} for ub in sizes}
    device, used_cache = None, 0
    for v in variants:
        kw = dict(VARIANTS[v])
        kw["cache_bytes"] = cache_bytes if kw.pop("cache", False) else 0
        with make_moe(**kw) as moe:
            device = moe.device
            if kw["cache_bytes"]:
                used_cache = moe.cache_bytes
            for ub in sizes:
                wall = measure(moe, ub)
                t = moe.stats.totals()
                res[ub][v] = dict(tps=n_tokens / wall, mb=t["bytes"] / n_tokens / 1e6, copies=t["copies"] / n_tokens)
    return Comparison(device, n_tokens, list(variants), [(ub, res[ub]) for ub in sizes], used_cache)


def compare_whole_model(model, prompt, sizes, variants=None, *, device="auto", cache_bytes=None, n_batch=2048,
                        repetitions=1, make_moe=None, progress=False, model_options=None, **backend) -> Comparison:
    """PR #15346's comparison on the whole model: ``prompt`` (token ids) through ``Transformer``
    at each ubatch size in ``sizes``, for each variant (default: ``default_variants``).

    The time of a test is the mean over ``repetitions`` prefills, after a warm-up that
    compiles the kernels; each prefill starts cold (no resident expert). ``cache_bytes``:
    the used+cache VRAM (default ``half_the_experts``). ``make_moe(**options)`` builds a
    backend (default ``HybridMoE(model.layers, device=device, **backend, **options)``);
    ``model_options``: more keywords for ``Transformer`` (the device kernels' tiles).
    """
    from .model.forward import Transformer
    prompt = np.asarray(prompt)
    if make_moe is not None and (backend or device != "auto"):
        raise TypeError("give either make_moe or the backend's options (device, ...), not both")
    if make_moe is None:
        def make_moe(**kw):
            return HybridMoE(model.layers, device=device, **backend, **kw)
    if variants is None:
        variants = default_variants(resolve_device(device), whole_model=True)
    _check_variants(variants)
    bad = [ub for ub in sizes if isinstance(ub, bool) or not isinstance(ub, (int, np.integer)) or ub < 1]
    if bad or not isinstance(repetitions, int) or repetitions < 1:
        raise ValueError(f"ubatch sizes and repetitions must be positive ints, got {list(sizes)}, {repetitions!r}")

    def measure(moe, ub):
        tr = Transformer(model, moe, n_ctx=len(prompt), n_batch=n_batch, n_ubatch=ub, **(model_options or {}))
        warm_up_model(tr, decode=False)
        walls = []
        for _ in range(repetitions):
            t0 = time.perf_counter()
            tr.prefill(prompt, logits="last", progress=progress)  # resets: statistics and cache start empty
            walls.append(time.perf_counter() - t0)
        return float(np.mean(walls))

    cache = half_the_experts(model.layers) if cache_bytes is None else cache_bytes
    return compare(make_moe, variants, sizes, measure, len(prompt), cache)


def compare_moe_only(layers, x: np.ndarray, sizes, variants, *, make_moe, cache_bytes=None,
                     progress=False) -> Comparison:
    """PR #15346's comparison on the MoE layers alone: hidden states ``x`` through every layer,
    ubatch by ubatch, for each variant and size (``make_moe(**options)`` builds the backends)."""
    def measure(moe, ub):
        warm_up(moe, x, ub)  # also resets: each size starts with a cold cache
        return run_prompt(moe, x, ub, progress=progress)

    cache = half_the_experts(layers) if cache_bytes is None else cache_bytes
    return compare(make_moe, variants, sizes, measure, x.shape[0], cache)


def _check_variants(variants):
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ValueError(f"unknown variant(s) {', '.join(map(repr, bad))}; choose from {', '.join(VARIANTS)}")


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


def warm_up_model(tr, decode: bool = True) -> float:
    """Compile every kernel a run of ``tr`` uses (a prompt ubatch; a decode step if ``decode``),
    then forget it (empty cache and statistics). Returns the seconds it took."""
    if tr.moe.device == "sim":  # simulator times mean nothing; spare the slow extra pass
        return 0.0
    t0 = time.perf_counter()
    n = min(tr.n_ubatch, tr.n_ctx - 1, max(tr.moe.min_offload_batch, 1))
    if n >= 1:
        tr.prefill(np.zeros(n, np.int64), logits="last")
        if decode:
            tr.decode_one_token(0)
    else:
        tr.prefill(np.zeros(1, np.int64), logits="last")
    tr.reset()
    return time.perf_counter() - t0


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
