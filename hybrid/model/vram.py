"""Device memory for the device-resident model, counted before anything is allocated.

Four items take VRAM: the dense weights (in the file's types, with norms, biases
and sinks in float32), the KV cache, the MoE backend (expert slots or the expert
cache, and the routers), and the scratch of one ubatch (the MoE engine's
buffers, the activations, the logits). Their sum must fit in the budget: what
the device has free, plus what a backend built beforehand already holds, or an
explicit ``vram_bytes`` (the simulator reports infinite memory, so tests and
the simulator give one). Too much raises ``VRAMError`` with every item, the
bytes short, and for each item the option that would make it fit on its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..moe.engine import router_dense, scratch_device_bytes
from ..kernels.cuda.attention import DeviceKVCache
from ..kernels.cuda.dense import DeviceDense
from ..kernels.cuda.experts import TileConfig

__all__ = ["Item", "VRAMError", "items", "check"]

MIB = 1 << 20


class VRAMError(ValueError):
    pass


@dataclass
class Item:
    what: str
    nbytes: int
    allocated: bool = False  # already on the device (a backend built before the model)
    fit: object = None  # bytes this item may take -> the option that fits it ("-c 2048"), or None


def _largest(lo, hi, ok):
    """The largest n in [lo, hi] with ok(n) (ok monotone decreasing), or None."""
    if hi < lo or not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def _option(flag, n):
    return None if n is None else f"{flag} {n}"


def items(tr, moe=None, *, device_bytes=None) -> list[Item]:
    """The VRAM items of Transformer ``tr`` (its config, dense weights, ``n_ctx``, ``n_ubatch``)
    over ``moe`` (a built HybridMoE, counted as allocated; None: the default backend, natural
    layout, one layer's experts)."""
    from .forward import device_activations  # (forward imports this module)

    cfg, L = tr.cfg, tr.model.layers[0]
    n_ctx, n_ub = tr.n_ctx, tr.n_ubatch
    dense = {id(d): d for b in tr.blocks for d in (b.wq, b.wk, b.wv, b.wo)}
    dense.update({id(tr.embd): tr.embd, id(tr.output): tr.output})
    vectors = [v for b in tr.blocks for v in (b.attn_norm, b.ffn_norm, b.bq, b.bk, b.bv, b.bo, b.sinks, b.q_norm,
                                              b.k_norm) if v is not None] + [tr.output_norm]
    weights = sum(DeviceDense.nbytes_for(d) for d in dense.values()) + sum(v.size * 4 for v in vectors)
    out = [Item(f"dense weights ({len(dense)} matrices in the file's types, {len(vectors)} float32 vectors)",
                weights)]

    def kv(c, ub):
        return DeviceKVCache.nbytes_for(cfg, c, ub)

    def scratch(ub):
        block = (moe.engine.tiles if moe is not None else TileConfig()).block_pairs
        n_rounds = 1 if moe is None else -(-L.n_experts // min(moe.n_slots, L.n_experts))
        act = sum(int(np.prod(s)) * 4 for s in device_activations(cfg, ub).values())
        return act + scratch_device_bytes(ub, L.k, L.n_embd, L.n_ff, L.n_experts, block, n_rounds)

    kv_now, scratch_now = kv(n_ctx, n_ub), scratch(n_ub)
    out.append(Item(f"KV cache (n_ctx {n_ctx}, n_ubatch {n_ub})", kv_now,
                    fit=lambda room: _option("-c", _largest(1, n_ctx - 1, lambda c: kv(c, n_ub) <= room))))
    E, per = L.n_experts, L.expert_bytes
    routers = sum(DeviceDense.nbytes_for(router_dense(layer)) for layer in tr.model.layers)
    if moe is None:
        slots, layout, cache = E, "natural", 0
    else:
        slots, layout, cache = moe.n_slots, moe.layout, moe.cache_bytes
    what = (f"MoE backend: expert cache of {slots} slots" if cache else
            f"MoE backend: {slots} expert slots ({layout} layout)") + f" x {per:,} B, and the routers"

    def fit_slots(room):
        # fewer slots than experts: more rounds, each with its slot map (int32 [E]) in the scratch
        rounds = lambda n: -(-E // min(n, E))  # noqa: E731
        n = _largest(1, slots - 1, lambda n: n * per + routers + (rounds(n) - rounds(slots)) * E * 4 <= room)
        if n is None:
            return None
        mib = f"{n * per / MIB:.6f}"
        return f"--cache-mb {mib}" if cache else f"--layout compact --device-mb {mib}"

    out.append(Item(what, slots * per + routers, allocated=moe is not None, fit=fit_slots))
    out.append(Item(f"ubatch scratch (n_ubatch {n_ub}: MoE engine buffers, activations, logits)", scratch_now,
                    fit=lambda room: _option("-ub", _largest(1, n_ub - 1,
                                                             lambda u: scratch(u) + kv(n_ctx, u) <= room + kv_now))))
    return out


def budget(device: str, vram_bytes, allocated: int):
    """Bytes the model may take in all: ``vram_bytes`` if given, else the device's free memory
    plus what is already allocated for it; None (no bound) on the simulator."""
    if vram_bytes is not None:
        if isinstance(vram_bytes, (bool, np.bool_)) or not isinstance(vram_bytes, (int, np.integer)) \
                or vram_bytes < 0:
            raise ValueError(f"vram_bytes must be a non-negative int or None, got {vram_bytes!r}")
        return int(vram_bytes)
    if device == "sim":
        return None
    from numba import cuda
    free, _total = cuda.current_context().get_memory_info()
    return int(free) + allocated


def check(tr, moe, vram_bytes, device: str = "cuda") -> list[Item]:
    """``items`` against ``budget``: returns the items, or raises VRAMError naming the bytes short,
    every item and, for each, the option that would make the model fit."""
    its = items(tr, moe)
    need = sum(i.nbytes for i in its)
    have = budget(moe.device if moe is not None else device, vram_bytes, sum(i.nbytes for i in its if i.allocated))
    if have is None or need <= have:
        return its
    short = need - have
    lines = [f"the model does not fit in device memory: it needs {need:,} bytes ({need / MIB:.1f} MiB), "
             f"{have:,} bytes ({have / MIB:.1f} MiB) are available: {short:,} bytes short"]
    for i in its:
        option = i.fit(i.nbytes - short) if i.fit is not None else None
        hint = f"{option} would fit" if option else ("fixed" if i.fit is None else "cannot fit alone")
        lines.append(f"  {i.what}: {i.nbytes:,} bytes{' (allocated)' if i.allocated else ''} -> {hint}")
    raise VRAMError("\n".join(lines))
