"""Synthetic router logits with the skew of real routing.

Real routers do not spread tokens evenly: on gpt-oss-120b (k=4, 128 experts) a
code prompt used 50-95 experts per layer at ubatch 512 and 84-128 at 2048
(llama.cpp PR #15346), where uniform routing uses all 128 at either size.

The model, per layer ``l`` of a preset:
  z[t, e] = -s_l * log(rank_l[e]) + boost * [e in topic(t)] + noise * N(0, 1)
- popularity: Zipf-like over a per-layer permutation ``rank_l`` of the experts,
  strength ``s_l = skew * (1 + depth * (l/(L-1) - 1/2)) * exp(jitter * N(0,1))``
  (deeper layers more skewed, as in the PR's lists);
- locality: the prompt is cut into topics (geometric lengths, mean
  ``topic_len`` tokens, the same cut in every layer); each topic boosts
  ``topic_experts`` random experts of the layer, so consecutive tokens share them.
The 120b parameters were fitted so the per-layer used counts match the PR's
lists (mean, spread and depth trend); see ``calibration_table``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf.constants import GGMLQuantizationType

from quant.types import row_nbytes

from .routing import bucket, route

EXPERT_SLAB_BYTES = 2880 * row_nbytes(GGMLQuantizationType.MXFP4, 2880)  # one gpt-oss expert matrix: 4,406,400 B


@dataclass(frozen=True)
class TrafficPreset:
    name: str
    n_experts: int
    k: int
    n_layers: int
    skew: float  # Zipf strength of expert popularity (0: none)
    depth: float  # relative rise of the strength from first to last layer
    jitter: float  # log-normal spread of the strength between layers
    noise: float  # per-token logit noise
    topic_len: float  # mean tokens per topic (locality)
    topic_experts: int  # experts a topic boosts (0: no locality)
    topic_boost: float  # logit added to a topic's experts
    slab_bytes: int = EXPERT_SLAB_BYTES  # bytes per expert per matrix
    n_matrices: int = 3  # gate, up, down

    def __post_init__(self):
        if not (1 <= self.k <= self.n_experts and self.n_layers >= 1):
            raise ValueError(f"preset {self.name}: need 1 <= k <= n_experts and n_layers >= 1")
        if self.topic_experts < 0 or (self.topic_experts and self.topic_len < 1):
            raise ValueError(f"preset {self.name}: topic_len must be >= 1 when topics are on")
        for f in ("skew", "depth", "jitter", "noise", "topic_boost"):
            if not np.isfinite(getattr(self, f)):
                raise ValueError(f"preset {self.name}: {f} must be finite")


# Fitted (seed 0, 36 layers): ubatch 512 -> mean 73 of 128 (57..92), 2048 -> 107 (89..121);
# the PR measured 75 (50..95) and 105 (84..128).
_FIT = dict(skew=1.5, depth=0.15, jitter=0.03, noise=1.6, topic_len=32.0, topic_experts=1, topic_boost=4.0)

PRESETS = {
    "gpt-oss-120b": TrafficPreset("gpt-oss-120b", 128, 4, 36, **_FIT),
    # No per-layer lists exist for 20b. Assumption: its routers leave the same
    # fraction of experts unused as 120b's (which needs a steeper skew over 32
    # experts): ubatch 512 -> 18 of 32, 2048 -> 26 of 32.
    "gpt-oss-20b": TrafficPreset("gpt-oss-20b", 32, 4, 24, **{**_FIT, "skew": 4.0}),
    "uniform": TrafficPreset("uniform", 128, 4, 36, skew=0.0, depth=0.0, jitter=0.0, noise=1.0,
                             topic_len=1.0, topic_experts=0, topic_boost=0.0),
}

_SEG_BLOCK = 1024  # topics drawn in fixed blocks so topic i never depends on n_tokens
_NOISE_BLOCK = 256  # tokens of noise per generator


def get_preset(preset) -> TrafficPreset:
    if isinstance(preset, TrafficPreset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown traffic preset {preset!r}; have {sorted(PRESETS)}")
    return PRESETS[preset]


def _int(name, v, lo, hi=None):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < lo or (hi is not None and v >= hi):
        raise ValueError(f"{name}={v} outside [{lo}, {'inf' if hi is None else hi})")
    return int(v)


def _topics(p: TrafficPreset, end, layer, seed):
    """Topic index of tokens [0, end) and each topic's boosted experts for this layer."""
    cut = np.random.default_rng([seed, 0x70])  # shared by all layers
    pick = np.random.default_rng([seed, layer, 0x71])
    bounds, experts, total = [], [], 0
    while total < end:
        lens = cut.geometric(1.0 / p.topic_len, _SEG_BLOCK)
        bounds.append(total + np.cumsum(lens))
        experts.append(pick.integers(0, p.n_experts, (_SEG_BLOCK, p.topic_experts)))
        total = int(bounds[-1][-1])
    return np.concatenate(bounds), np.concatenate(experts)


def _noise(E, start, n, layer, seed):
    # Drawn in fixed token blocks, so a window's values do not depend on how the
    # prompt is cut into ubatches.
    b0, b1 = start // _NOISE_BLOCK, -(-(start + n) // _NOISE_BLOCK)
    blocks = [np.random.default_rng([seed, layer, 0x4E, b]).standard_normal((_NOISE_BLOCK, E), dtype=np.float32)
              for b in range(b0, b1)]
    off = start - b0 * _NOISE_BLOCK
    return np.concatenate(blocks)[off:off + n] if blocks else np.empty((0, E), np.float32)


def synthetic_logits(preset, n_tokens, layer=0, seed=0, start=0) -> np.ndarray:
    """Router logits float32 ``[n_tokens, n_experts]`` for tokens ``start..start+n_tokens``
    of prompt ``seed`` at ``layer``. Deterministic, and independent of how the
    prompt is cut: ``synthetic_logits(p, 1024)[512:] == synthetic_logits(p, 512, start=512)``."""
    p = get_preset(preset)
    n = _int("n_tokens", n_tokens, 0)
    layer = _int("layer", layer, 0, p.n_layers)
    seed = _int("seed", seed, 0)
    start = _int("start", start, 0)
    E = p.n_experts
    pop = np.random.default_rng([seed, layer, 0x50])
    rank = pop.permutation(E) + 1
    s = p.skew * (1 + p.depth * (layer / max(p.n_layers - 1, 1) - 0.5)) * np.exp(p.jitter * pop.standard_normal())
    base = (-s * np.log(rank)).astype(np.float32)
    z = _noise(E, start, n, layer, seed)
    z *= np.float32(p.noise)
    z += base
    if p.topic_experts and n:
        bounds, experts = _topics(p, start + n, layer, seed)
        topic = np.searchsorted(bounds, np.arange(start, start + n), side="right")
        rows = np.arange(n)[:, None]
        z[rows, experts[topic]] = z[rows, experts[topic]] + np.float32(p.topic_boost)
    return z


def used_experts(preset, n_tokens, layer=0, seed=0, start=0) -> np.ndarray:
    """Sorted unique experts the preset's router picks for one ubatch (int32)."""
    p = get_preset(preset)
    ids, _ = route(synthetic_logits(p, n_tokens, layer, seed, start), p.k)
    return bucket(ids, p.n_experts).used


def calibration_table(preset, ubatches=(128, 256, 512, 1024, 2048), layers=None, seed=0, show=False):
    """Experts used per layer at each ubatch size: list of rows
    ``{"ubatch", "mean", "min", "max", "n_experts", "per_layer"}``; ``show`` prints markdown."""
    p = get_preset(preset)
    layers = range(p.n_layers) if layers is None else list(layers)
    rows = []
    for ub in ubatches:
        counts = np.array([used_experts(p, ub, layer, seed).shape[0] for layer in layers])
        rows.append(dict(ubatch=int(ub), mean=float(counts.mean()), min=int(counts.min()),
                         max=int(counts.max()), n_experts=p.n_experts, per_layer=counts))
    if show:
        print(format_calibration(p.name, rows))
    return rows


def format_calibration(name, rows) -> str:
    lines = [f"Experts used per layer, {name} (synthetic)", "",
             "| ubatch | mean | min | max | of |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['ubatch']} | {r['mean']:.1f} | {r['min']} | {r['max']} | {r['n_experts']} |" for r in rows]
    return "\n".join(lines)


def synthetic_hidden(n_tokens: int, n_embd: int, seed: int = 0, topic_len: float = 32.0) -> np.ndarray:
    """Made-up hidden states float32 ``[n_tokens, n_embd]``, RMS 1 per token (as after a norm).

    Not a model's activations. Tokens come in topics (runs of geometric length,
    mean ``topic_len``) that share a direction, so consecutive tokens route
    alike, as real prompts do; the result does not depend on the ubatch size.
    """
    rng = np.random.default_rng([seed, 0x4849])
    n_topics = max(1, int(np.ceil(2 * n_tokens / topic_len)) + 1)
    lengths = rng.geometric(1.0 / topic_len, n_topics)
    topic = np.repeat(np.arange(n_topics), lengths)
    topic = np.concatenate([topic, np.full(max(0, n_tokens - topic.size), n_topics - 1)])[:n_tokens]
    centres = rng.standard_normal((n_topics, n_embd))
    x = 0.8 * centres[topic] + 0.6 * rng.standard_normal((n_tokens, n_embd))
    x /= np.sqrt(np.mean(x * x, axis=1, keepdims=True))
    return x.astype(np.float32)


def ubatches(n_tokens: int, ub: int):
    return [(s, min(s + ub, n_tokens)) for s in range(0, n_tokens, ub)]


def usage_counts(layers, x: np.ndarray, ub: int) -> np.ndarray:
    """Experts used, int ``[n_layers, n_ubatches]``: the routing the scheduler does, nothing else."""
    parts = ubatches(x.shape[0], ub)
    out = np.zeros((len(layers), len(parts)), np.int64)
    for li, L in enumerate(layers):
        for u, (s, e) in enumerate(parts):
            ids, _ = L.route(x[s:e])
            out[li, u] = bucket(ids, L.n_experts).used.size
    return out
