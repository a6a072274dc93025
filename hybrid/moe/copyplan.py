"""The coalescer: sorted used expert ids -> the fewest host-to-device copies.

PR #15346's rule: one copy per maximal run of consecutive used ids, at the same
byte offset on the device (``natural``). ``compact`` packs the used experts into
slots 0..U-1 so device memory scales with the experts used. A ``CostModel``
optionally merges short gaps of unused experts into one copy when copying the
gap is cheaper than the latency of one more copy.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numba as nb
import numpy as np

from quant import jitcache

LAYOUTS = ("natural", "compact")
PAD_BYTES = 512  # PR #15346: min(slab, 512) bytes copied past a run


@dataclass(frozen=True)
class CostModel:
    """One copy costs ``latency_s`` plus its bytes over ``bandwidth_Bps``."""

    latency_s: float
    bandwidth_Bps: float

    def __post_init__(self):
        if not (np.isfinite(self.latency_s) and self.latency_s >= 0):
            raise ValueError(f"latency_s must be finite and >= 0, got {self.latency_s}")
        if not (np.isfinite(self.bandwidth_Bps) and self.bandwidth_Bps > 0):
            raise ValueError(f"bandwidth_Bps must be finite and > 0, got {self.bandwidth_Bps}")

    def of(self, plan: "CopyPlan") -> float:
        """Modelled seconds of a plan: copies * latency + bytes / bandwidth."""
        return plan.n_copies * self.latency_s + plan.total_bytes / self.bandwidth_Bps


@dataclass
class CopyPlan:
    """One row per copy; byte offsets into the host tensor and the device buffer."""

    layout: str
    slab_bytes: int
    n_experts: int
    src: np.ndarray  # int64 host byte offset
    dst: np.ndarray  # int64 device byte offset
    nbytes: np.ndarray  # int64
    first: np.ndarray  # int32 first expert of the copy
    last: np.ndarray  # int32 last expert of the copy (merged gaps included)
    dst_slot: np.ndarray  # int32 device slot of ``first`` (the row's experts follow)
    slot: np.ndarray  # int32 [E] device slot of each expert after the plan, -1 if absent
    device_bytes: int  # size the device buffer must have
    pad_tail: bool = False

    @property
    def n_copies(self) -> int:
        return int(self.src.shape[0])

    @property
    def total_bytes(self) -> int:
        return int(self.nbytes.sum())

    @property
    def host_bytes(self) -> int:
        return self.n_experts * self.slab_bytes

    def cost(self, model: CostModel) -> float:
        return model.of(self)

    def for_slab(self, slab_bytes: int) -> "CopyPlan":
        return plan_for(self, slab_bytes)


@jitcache.njit(cache=True)
def _runs(used, slab, merge, latency, bandwidth):
    # Maximal runs of consecutive ids; with merge, a gap of g unused experts
    # joins its neighbours when g * slab / bandwidth < latency.
    n = used.shape[0]
    first = np.empty(n, np.int32)
    last = np.empty(n, np.int32)
    r = -1
    for i in range(n):
        e = used[i]
        if r >= 0:
            gap = e - last[r] - 1
            if gap == 0 or (merge and gap * slab / bandwidth < latency):
                last[r] = e
                continue
        r += 1
        first[r] = e
        last[r] = e
    return first[:r + 1].copy(), last[:r + 1].copy()


def extents(first, last, dst_slot, unit):
    """``(src, dst, n)`` int64 of copy rows ``(first, last, dst_slot)`` (expert units) for a
    tensor of ``unit`` bytes or elements per expert: ``host[src:src+n] -> dev[dst:dst+n]``.

    The one computation of what a row moves: the plan's byte offsets, the
    engine's copies and the counts of the CPU target all come from here.
    """
    f = np.asarray(first, np.int64)
    return f * unit, np.asarray(dst_slot, np.int64) * unit, (np.asarray(last, np.int64) - f + 1) * unit


@jitcache.njit(cache=True)
def _slots(first, last, n_exp, compact):
    # Device slots equal the expert ids (natural) or follow the running count
    # of experts copied (compact).
    r = first.shape[0]
    dst_slot = np.empty(r, np.int32)
    slot = np.full(n_exp, -1, np.int32)
    base = 0
    for i in range(r):
        n = last[i] - first[i] + 1
        dst_slot[i] = base if compact else first[i]
        for j in range(n):
            slot[first[i] + j] = dst_slot[i] + j
        base += n
    return dst_slot, slot, base if compact else n_exp


def _check_pos_int(name, v, lo=1):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{name}={v} must be >= {lo}")
    return int(v)


def _check_used(used, n_experts):
    if not isinstance(used, np.ndarray):
        raise TypeError(f"used must be a numpy array, got {type(used).__name__}")
    if not np.issubdtype(used.dtype, np.integer):
        raise TypeError(f"used must be an integer array, got {used.dtype}")
    if used.ndim != 1:
        raise ValueError(f"used must be 1-D, got shape {used.shape}")
    if n_experts > np.iinfo(np.int32).max:
        raise ValueError(f"n_experts={n_experts} does not fit int32 expert ids")
    if used.size:
        if used[0] < 0 or used[-1] >= n_experts:
            bad = used[0] if used[0] < 0 else used[-1]
            raise ValueError(f"used expert id {bad} outside [0, n_experts={n_experts})")
        step = np.diff(used)
        if np.any(step <= 0):
            i = int(np.argmax(step <= 0))
            raise ValueError(f"used must be sorted and unique: used[{i}]={used[i]}, "
                             f"used[{i + 1}]={used[i + 1]}")
    return np.ascontiguousarray(used, dtype=np.int32)


def ranges(used):
    """Maximal runs of consecutive ids: ``(first int32[R], last int32[R])``."""
    if not isinstance(used, np.ndarray):
        raise TypeError(f"used must be a numpy array, got {type(used).__name__}")
    hi = int(used.max()) + 1 if used.size else 1
    u = _check_used(used, max(hi, 1))
    return _runs(u, 1, False, 0.0, 1.0)


def plan(used, slab_bytes, n_experts, layout="natural", pad_tail=False, cost=None) -> CopyPlan:
    """The copy list for one expert tensor whose experts ``used`` are needed.

    used: sorted unique int ids in ``[0, n_experts)``. slab_bytes: bytes of one
    expert. ``pad_tail`` (natural only) copies PR #15346's ``min(slab, 512)``
    extra bytes past each run that does not end at the last expert. ``cost``
    (a CostModel) turns on gap merging.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if pad_tail and layout != "natural":
        raise ValueError("pad_tail is PR #15346's natural-layout padding; it needs layout='natural'")
    if cost is not None and not isinstance(cost, CostModel):
        raise TypeError(f"cost must be a CostModel or None, got {type(cost).__name__}")
    slab = _check_pos_int("slab_bytes", slab_bytes)
    n_exp = _check_pos_int("n_experts", n_experts)
    u = _check_used(used, n_exp)
    merge = cost is not None
    first, last = _runs(u, slab, merge, cost.latency_s if merge else 0.0,
                        cost.bandwidth_Bps if merge else 1.0)
    return _build(layout, slab, n_exp, first, last, bool(pad_tail))


def _build(layout, slab, n_exp, first, last, pad_tail):
    if n_exp * slab > np.iinfo(np.int64).max:
        raise ValueError(f"{n_exp} experts x {slab} bytes overflow int64 byte offsets")
    dst_slot, slot, n_slots = _slots(first, last, n_exp, layout == "compact")
    src, dst, nbytes = extents(first, last, dst_slot, slab)
    if pad_tail:  # PR #15346: min(slab, 512) bytes past every run but one ending at the last expert
        nbytes = nbytes + np.where(last < n_exp - 1, min(slab, PAD_BYTES), 0)
    return CopyPlan(layout, slab, n_exp, src, dst, nbytes, first, last, dst_slot, slot, int(n_slots) * slab,
                    pad_tail)


def plan_for(p: CopyPlan, slab_bytes) -> CopyPlan:
    """The same ranges and slots for another tensor of the layer (another slab size).

    gate, up, down and the biases share one routing: merges decided for one
    tensor hold for all, so slot[e] is valid across the layer's tensors.
    """
    if not isinstance(p, CopyPlan):
        raise TypeError(f"expected a CopyPlan, got {type(p).__name__}")
    slab = _check_pos_int("slab_bytes", slab_bytes)
    if slab == p.slab_bytes:
        return replace(p)
    return _build(p.layout, slab, p.n_experts, p.first, p.last, p.pad_tail)


@jitcache.njit(cache=True)
def _slot_runs(experts, slots):
    n = experts.shape[0]
    first = np.empty(n, np.int32)
    last = np.empty(n, np.int32)
    dst = np.empty(n, np.int32)
    r = -1
    for i in range(n):
        if r >= 0 and experts[i] == last[r] + 1 and slots[i] == dst[r] + (last[r] - first[r]) + 1:
            last[r] = experts[i]
            continue
        r += 1
        first[r] = experts[i]
        last[r] = experts[i]
        dst[r] = slots[i]
    return first[:r + 1].copy(), last[:r + 1].copy(), dst[:r + 1].copy()


def slot_runs(experts, slots):
    """Copies for experts placed in given device slots (a residency pool).

    A run of consecutive ids going to consecutive slots is one copy:
    ``(first, last, first_slot)`` int32 arrays, one row per copy.
    """
    experts = np.asarray(experts)
    slots = np.asarray(slots)
    if experts.shape != slots.shape or experts.ndim != 1:
        raise ValueError(f"experts {experts.shape} and slots {slots.shape} must be 1-D of one length")
    if not (np.issubdtype(experts.dtype, np.integer) and np.issubdtype(slots.dtype, np.integer)):
        raise TypeError(f"experts and slots must be integer arrays, got {experts.dtype} and {slots.dtype}")
    if experts.size and max(int(experts.max()), int(slots.max())) > np.iinfo(np.int32).max:
        raise ValueError("expert ids and slots must fit int32")
    if experts.size:
        if np.any(np.diff(experts) <= 0):
            raise ValueError("experts must be sorted and unique")
        if experts.min() < 0 or slots.min() < 0:
            raise ValueError("expert ids and slots must be non-negative")
        order = np.argsort(slots, kind="stable")
        dup = np.flatnonzero(np.diff(slots[order]) == 0)
        if dup.size:  # two experts copied into one slot: the second would overwrite the first
            a, b = experts[order[dup[0]]], experts[order[dup[0] + 1]]
            raise ValueError(f"slots must be distinct: experts {a} and {b} both go to slot {slots[order[dup[0]]]}")
    return _slot_runs(experts.astype(np.int32), slots.astype(np.int32))
