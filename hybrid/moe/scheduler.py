"""One ubatch through one MoE layer: route, plan, copy, compute, record.

``HybridMoE.forward`` reads top-down as the data flow of docs/design.md section 5:

1. route   router logits on the host, then Numba top-k, weights and buckets;
2. plan    which experts the device needs (``all`` or ``used``) and where they
           go: the natural layout (slot = expert id, PR #15346) or slots from
           a pool that can keep experts resident across ubatches (LRU cache);
3. copy    the engine executes the plan's rows: one async copy per row and
           tensor on a copy stream, each row followed by an event;
4. compute grouped kernels on the compute stream in waves that fill the GPU,
           each waiting only on the last copy event it needs, so compute
           overlaps the remaining copies; the top-k sum reduced without atomics;
5. record  used experts, cache hits, times, and the copies and bytes the
           engine reports it enqueued (the CPU target: the plan's, "planned").

``forward_routed`` starts at step 2 with a routing given (tests, or a model
runner that routes elsewhere).

Batches below ``min_offload_batch`` tokens run on the CPU path. The ``cpu``
target plans and counts the copies it would make but computes on the CPU.

Hidden states may live on the device (the device-resident model): then the
router logits are computed there and only they come to the host (step 1, the
one synchronisation per layer), the kernels read the hidden states in place
and the output is reduced into a device array. Below ``min_offload_batch`` the
small ``x`` comes down with the logits and the CPU experts' result goes back up.
"""
from __future__ import annotations

import logging
import time

import numba
import numpy as np

from quant.cuda import is_device_array

from . import copyplan, routing
from .cpu import CpuTiles, moe_ffn_cpu_trusted
from .layer import MoELayer
from .residency import SlotPool
from .stats import Stats, TensorRecord, UbatchRecord
from .transfer import HOST_MODES

log = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "sim", "cpu")
POLICIES = ("all", "used")
LAYOUTS = copyplan.LAYOUTS
MIN_OFFLOAD_BATCH = 32  # llama.cpp's GGML_OP_OFFLOAD_MIN_BATCH default


def resolve_device(device: str) -> str:
    """The target ``device`` names; ``auto`` is ``cuda`` when a GPU is present, else ``cpu``."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    sim = bool(numba.config.ENABLE_CUDASIM)
    if device == "sim" and not sim:
        raise ValueError("device='sim' needs NUMBA_ENABLE_CUDASIM=1 in the environment before numba is imported")
    if device in ("cuda", "auto") and not sim:
        from numba import cuda
        if cuda.is_available():
            return "cuda"
        if device == "cuda":
            raise ValueError("device='cuda' but no CUDA GPU is available (numba.cuda.is_available() is False)")
    if device == "cuda" and sim:
        raise ValueError("device='cuda' but NUMBA_ENABLE_CUDASIM=1 selects the simulator; use device='sim'")
    return "sim" if device == "sim" else "cpu"


class HybridMoE:
    """Runs the MoE layers of a model with experts in host memory.

    layers: the model's ``MoELayer``s (all of one shape). policy ``all`` copies
    every expert (llama.cpp before PR #15346), ``used`` only the routed ones.
    layout ``natural`` keeps device offset = host offset; ``compact`` packs the
    experts into slots. ``cache_bytes`` > 0 keeps experts resident in a pool of
    that many bytes of VRAM across ubatches and layers (compact slots, LRU).
    ``device_bytes`` bounds the expert slots when there is no cache: too small
    for a ubatch's experts means rounds (compact) or a clear error (natural).
    ``merge`` (a ``copyplan.CostModel``, natural layout only) also copies a gap
    of unused experts when that is cheaper than one more copy. ``launch_tiles``:
    at least this many tiles per kernel launch (None: enough to fill the GPU;
    1: one launch per copy range). ``cache_bytes`` above what every layer's
    experts take is capped there (logged): a larger pool could never fill.
    ``tiles`` (a ``kernels.TileConfig``) sizes the device kernels and ``dense_tiles``
    (a ``device_dense.DenseTiles``) the router's device matmul, for hidden states on
    the device; the cpu target has none and ignores both.

    Inputs are validated here and in ``forward``; the calls inside trust them.
    """

    def __init__(self, layers, *, device="auto", policy="used", layout="natural", host="auto",
                 cache_bytes=0, device_bytes=None, min_offload_batch=MIN_OFFLOAD_BATCH,
                 overlap=True, merge: copyplan.CostModel | None = None, tiles=None,
                 launch_tiles: int | None = None, dense_tiles=None, stats: Stats | None = None):
        layers = list(layers)
        if not layers or not all(isinstance(l, MoELayer) for l in layers):
            raise TypeError("layers must be a non-empty list of MoELayer")
        first = layers[0]
        # Device buffers and host copy offsets are laid out once, from the first layer.
        shape = lambda l: (l.n_experts, l.n_embd, l.n_ff, l.k, l.gate_b is None, l.up_b is None,  # noqa: E731
                           l.down_b is None)
        if any(shape(l) != shape(first) for l in layers):
            raise ValueError("all layers must share n_experts, n_embd, n_ff, k and biases")
        # Files quantised by llama.cpp mix types across layers (Q4_K_M: Q6_K for some ffn_down):
        # the CPU path and the device without a cache take them as they are (each layer its own
        # view of the slots); a cache's slots outlive a layer, so it needs one type per role.
        types = lambda l: tuple(t.ggml_type for t in (l.gate, l.up, l.down))  # noqa: E731
        mixed = [l for l in layers if types(l) != types(first)]
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        for name, v in (("cache_bytes", cache_bytes), ("min_offload_batch", min_offload_batch)):
            if not _is_int(v) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if device_bytes is not None and (not _is_int(device_bytes) or device_bytes <= 0):
            raise ValueError(f"device_bytes must be a positive int or None, got {device_bytes!r}")
        if stats is not None and not isinstance(stats, Stats):
            raise TypeError(f"stats must be a hybrid.moe.stats.Stats or None, got {type(stats).__name__}")
        if tiles is not None:
            from ..kernels.cuda.experts import TileConfig  # only when given: the cpu target imports no kernels
            if not isinstance(tiles, TileConfig):
                raise TypeError(f"tiles must be a kernels.TileConfig or None, got {type(tiles).__name__}")
        if host not in HOST_MODES:
            raise ValueError(f"host mode must be one of {HOST_MODES}, got {host!r}")
        if launch_tiles is not None and (isinstance(launch_tiles, (bool, np.bool_))
                                         or not isinstance(launch_tiles, (int, np.integer)) or launch_tiles < 1):
            raise ValueError(f"launch_tiles must be a positive int or None, got {launch_tiles!r}")
        if cache_bytes and layout == "natural":
            layout = "compact"  # a cache is a pool of slots; natural offsets cannot hold several layers
        if merge is not None and (layout != "natural" or not isinstance(merge, copyplan.CostModel)):
            raise ValueError("merge takes a copyplan.CostModel and the natural layout without a cache")
        self.layers = layers
        self.device = resolve_device(device)
        if mixed and self.device != "cpu" and cache_bytes:
            from quant.registry import type_name
            names = lambda l: "/".join(type_name(t) for t in types(l))  # noqa: E731
            raise ValueError(f"the expert cache lays out one expert type per tensor for all layers, and this "
                             f"file mixes them (gate/up/down: block {first.index} {names(first)}, block "
                             f"{mixed[0].index} {names(mixed[0])}): run it without a cache (--cache-mb 0) "
                             f"or with --device cpu")
        self.policy, self.layout, self.overlap, self.merge = policy, layout, bool(overlap), merge
        self.cache_bytes, self.min_offload_batch = int(cache_bytes), int(min_offload_batch)
        self.stats = stats if stats is not None else Stats()
        self._ubatch = 0

        E = first.n_experts
        self.roles = first.copied()
        self.expert_bytes = max(l.expert_bytes for l in layers)  # one expert, every tensor (the largest layer's)
        usable = len(layers) * E * self.expert_bytes
        if self.cache_bytes > usable:  # one number must not allocate more than the model can use
            log.info("cache_bytes capped at %d: every expert of the %d layer(s) fits", usable, len(layers))
            self.cache_bytes = cache_bytes = usable
        if layout == "natural":
            self.n_slots = E
            need = E * self.expert_bytes
            if device_bytes is not None and need > device_bytes:
                raise ValueError(f"the natural layout needs {need:,} bytes of device memory for one layer's "
                                 f"{E} experts, device_bytes is {device_bytes:,}; use layout='compact'")
            self.pool = None
        else:
            budgets = [b for b in (cache_bytes, device_bytes) if b]
            budget = min(budgets) if budgets else E * self.expert_bytes
            self.n_slots = budget // self.expert_bytes
            if not cache_bytes:
                self.n_slots = min(E, self.n_slots)  # without a cache, one layer's experts at most
            if self.n_slots < 1:
                raise ValueError(f"{budget:,} bytes of device memory cannot hold one expert "
                                 f"({self.expert_bytes:,} bytes for its {len(self.roles)} tensors)")
            self.pool = SlotPool(self.n_slots, persistent=bool(cache_bytes))
        self.engine = None
        if self.device in ("cuda", "sim"):
            from .engine import DeviceEngine
            self.engine = DeviceEngine(layers, self.n_slots, host=host, tiles=tiles, dense_tiles=dense_tiles,
                                       launch_tiles=None if launch_tiles is None else int(launch_tiles))
            log.info("host memory: %s %s", self.engine.host.mode, self.engine.host.note)
        log.info("device: %s, policy %s, layout %s, %d slots", self.device, policy, layout, self.n_slots)

    @property
    def host_mode(self) -> str:
        return self.engine.host.mode if self.engine else "none"

    @property
    def stream(self):
        """The device stream hidden states on the device are read and written on, in order
        (None on the cpu target): a caller enqueues its own work on it."""
        return self.engine.compute_stream if self.engine else None

    def synchronize(self) -> None:
        """Wait for the device work enqueued so far and complete its step times in ``stats``."""
        if self.engine:
            self.engine.settle()

    def reset(self) -> None:
        """Forget statistics and every resident expert (start a new prompt cold)."""
        self.stats.clear()
        self._ubatch = 0
        if self.pool is not None:
            self.pool.clear()

    def close(self):
        if self.engine:
            self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def forward(self, layer, x, ubatch: int | None = None, *, cpu_tiles: CpuTiles | None = None, out=None):
        """The MoE output float32 ``[n_tokens, n_embd]`` of ``layer`` (index or MoELayer) for ``x``.

        ``x`` a numpy array: a new numpy array. ``x`` a device array (``cuda``/``sim``
        targets): the output goes into the device array ``out`` (default: a new one), which
        is returned; both are used in order on ``self.stream`` (see the module doc).
        ``cpu_tiles`` (a ``cpu.CpuTiles``) for batches on the CPU path; default ``cpu.TILES``,
        whose ``q8_tokens`` multiplies lightly used experts (every decode step's) with int8
        activations as ggml does; ``cpu.F32_TILES`` keeps float32 activations.
        """
        L = self._layer(layer)
        _check_call(ubatch, cpu_tiles)
        on_device = is_device_array(x)
        if on_device:
            out = self._check_device_io(x, out, L.n_embd)
        else:
            x = _check_hidden(x, L.n_embd)
            if out is not None:
                raise TypeError("out is for hidden states on the device; numpy hidden states get a new array")
        # 1. route
        t0 = time.perf_counter()
        x_host, wait = x, 0.0
        if on_device:
            # The one synchronisation per layer, as in llama.cpp: the router logits (T x E) come
            # to the host for the Numba top-k and the copy plan (with x when the CPU runs the experts).
            logits, x_host, wait = self.engine.route_inputs(L, x, with_x=x.shape[0] < self.min_offload_batch)
            if not np.isfinite(logits).all():
                raise ValueError(f"layer {L.index}: the router logits hold NaN or inf: so do the hidden states")
            ids, weights = L.route_logits(logits)
        else:
            ids, weights = L.route(x)
        return self._forward(L, x, ids, weights, ubatch, time.perf_counter() - t0 - wait, cpu_tiles,
                             x_host=x_host, out=out, wait=wait)

    def forward_routed(self, layer, x: np.ndarray, ids: np.ndarray, weights: np.ndarray,
                       ubatch: int | None = None, *, cpu_tiles: CpuTiles | None = None) -> np.ndarray:
        """As ``forward`` for numpy ``x``, with the routing given: ``ids`` int [T, k] (distinct per
        token, in ``[0, n_experts)``) and ``weights`` float32 [T, k] (finite)."""
        L = self._layer(layer)
        _check_call(ubatch, cpu_tiles)
        x = _check_hidden(x, L.n_embd)
        T, k = x.shape[0], L.k
        if not isinstance(ids, np.ndarray) or not np.issubdtype(ids.dtype, np.integer) or ids.shape != (T, k):
            raise ValueError(f"ids must be an int array [{T}, {k}], got {getattr(ids, 'dtype', type(ids))} "
                             f"{getattr(ids, 'shape', '')}")
        if ids.min() < 0 or ids.max() >= L.n_experts:
            raise ValueError(f"ids hold expert ids outside [0, {L.n_experts})")
        if k > 1 and (np.diff(np.sort(ids, axis=1), axis=1) == 0).any():
            raise ValueError("ids repeat an expert within a token")
        if not isinstance(weights, np.ndarray) or weights.dtype != np.float32 or weights.shape != (T, k):
            raise ValueError(f"weights must be float32 [{T}, {k}], got {getattr(weights, 'dtype', type(weights))} "
                             f"{getattr(weights, 'shape', '')}")
        if not np.isfinite(weights).all():
            raise ValueError("weights hold NaN or inf")
        return self._forward(L, x, np.ascontiguousarray(ids, np.int32), np.ascontiguousarray(weights), ubatch, 0.0,
                             cpu_tiles, x_host=x)

    def _layer(self, layer) -> MoELayer:
        if isinstance(layer, (bool, np.bool_)):
            raise TypeError("layer must be an int index or one of this backend's MoELayers, got a bool")
        if isinstance(layer, (int, np.integer)):
            if not 0 <= layer < len(self.layers):
                raise ValueError(f"layer {layer} outside [0, {len(self.layers)})")
            return self.layers[layer]
        if any(layer is l for l in self.layers):
            return layer
        raise ValueError("layer is not one of this backend's layers")

    def _check_device_io(self, x, out, n_embd):
        """Hidden states on the device and the output array for them (made when None)."""
        if self.engine is None:
            raise TypeError("hidden states on the device need device='cuda' or 'sim'; this backend "
                            "runs on the cpu target")
        for name, a in (("hidden states", x), ("out", out)):
            if a is None:
                continue
            if not is_device_array(a):
                raise TypeError(f"{name} must be a device array like the hidden states, got {type(a).__name__}")
            if np.dtype(a.dtype) != np.float32:
                raise TypeError(f"{name} must be float32, got {a.dtype}")
            if len(a.shape) != 2 or a.shape[1] != n_embd or a.shape[0] != x.shape[0]:
                raise ValueError(f"{name} must be [n_tokens, {n_embd}], got {tuple(a.shape)}")
            if not a.is_c_contiguous():
                raise ValueError(f"{name} must be C-contiguous")
        if x.shape[0] == 0:
            raise ValueError("hidden states hold no tokens")
        if out is None:
            from numba import cuda
            out = cuda.device_array(tuple(x.shape), np.float32, stream=self.stream)
        return out

    def _forward(self, L, x, ids, weights, ubatch, t_route, cpu_tiles, *, x_host, out=None, wait=0.0):
        T, E = x.shape[0], L.n_experts
        rec = UbatchRecord(layer=L.index, ubatch=self._ubatch if ubatch is None else ubatch, n_tokens=T,
                           path="cpu", policy=self.policy, used=0, n_experts=E)
        rec.times["wait"] = wait
        t0 = time.perf_counter()
        block = self.engine.tiles.block_pairs if self.engine else 1
        bk = routing.bucket(ids, E, block_size=block)
        rec.used = int(bk.used.size)
        rec.times["route"] = t_route + time.perf_counter() - t0

        offload = T >= self.min_offload_batch
        if offload:
            rec.path = "offload"
        if not offload or self.engine is None:
            rounds = []
            if offload:  # cpu target: plan and count what the device would copy
                t0 = time.perf_counter()
                rounds = self._rounds(L, bk)
                rec.times["plan"] = time.perf_counter() - t0
            self._record_copies(rec, L, rounds, planned(L, rounds))
            t0 = time.perf_counter()
            y = moe_ffn_cpu_trusted(L, x_host, ids, weights, cpu_tiles)  # all checked above
            if out is not None:  # hidden states on the device: the result goes back up
                y = self.engine.upload(y, out)
            rec.times["compute"] = time.perf_counter() - t0
            self.stats.add(rec)
            return y
        # 2. plan
        t0 = time.perf_counter()
        rounds = self._rounds(L, bk)
        rec.times["plan"] = time.perf_counter() - t0
        # 3-4. copy and compute, round by round; the engine reports what it enqueued
        out, enqueued = self.engine.run(L, x, weights, bk, rounds, overlap=self.overlap, times=rec.times, out=out)
        # 5. record
        self._record_copies(rec, L, rounds, enqueued)
        self.stats.add(rec)
        return out

    def end_ubatch(self):
        """Mark the end of a ubatch (every layer done): the next forward starts a new one."""
        self._ubatch += 1

    def _rounds(self, L: MoELayer, bk) -> list["Round"]:
        """Step 2: the experts to compute, in rounds that fit the device slots, each with the
        copies (copyplan's rows) that bring the ones not resident."""
        E = L.n_experts
        want = np.arange(E, dtype=np.int32) if self.policy == "all" else bk.used
        if self.pool is None:  # natural: slot = expert id, one round
            p = copyplan.plan(want, self.expert_bytes, E, "natural", cost=self.merge)
            return [Round(want, np.arange(E, dtype=np.int32), p.first, p.last, p.dst_slot, 0)]
        rounds = []
        for i in range(0, want.size, self.n_slots):
            experts = want[i:i + self.n_slots]
            slots, miss = self.pool.assign(L.index, experts)
            # trusted: sorted unique experts, distinct slots from the pool (slot_runs checks callers' input)
            first, last, dst = copyplan._slot_runs(experts[miss], slots[miss])
            slot_map = np.full(E, -1, np.int32)
            slot_map[experts] = slots
            rounds.append(Round(experts, slot_map, first, last, dst, int((~miss).sum())))
        return rounds

    def _record_copies(self, rec: UbatchRecord, L: MoELayer, rounds, copies) -> None:
        """One TensorRecord per copied tensor from ``copies[r] = (copies, bytes)``: what the
        engine enqueued, or on the CPU target what it would have (``planned``)."""
        rec.rounds = len(rounds)
        hits = sum(r.hits for r in rounds)
        for c, (n, nbytes) in zip(L.copied(), copies):
            rec.tensors.append(TensorRecord(c.name, rec.used, L.n_experts, int(n), int(nbytes), hits))


def planned(L: MoELayer, rounds) -> np.ndarray:
    """``[tensor] -> (copies, bytes)`` the rounds' copy rows make: one copy per row and tensor."""
    n_rows = sum(r.first.size for r in rounds)
    return np.array([(n_rows, sum(int(copyplan.extents(r.first, r.last, r.dst_slot, c.slab_bytes)[2].sum())
                                  for r in rounds)) for c in L.copied()], np.int64).reshape(-1, 2)


class Round:
    """Experts computed together, their slots, and the copies (in expert runs) that bring the misses."""

    def __init__(self, experts, slot_map, first, last, dst_slot, hits):
        self.experts, self.slot_map = experts, slot_map
        self.first, self.last, self.dst_slot = first, last, dst_slot
        self.hits = hits


def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _check_call(ubatch, cpu_tiles):
    if ubatch is not None and not _is_int(ubatch):
        raise TypeError(f"ubatch must be an int or None, got {type(ubatch).__name__}")
    if cpu_tiles is not None and not isinstance(cpu_tiles, CpuTiles):
        raise TypeError(f"cpu_tiles must be a cpu.CpuTiles or None, got {type(cpu_tiles).__name__}")


def _check_hidden(x, n_embd):
    if not isinstance(x, np.ndarray):
        raise TypeError(f"hidden states must be a numpy array, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise TypeError(f"hidden states must be float32, got {x.dtype}")
    if x.ndim != 2 or x.shape[1] != n_embd:
        raise ValueError(f"hidden states must be [n_tokens, {n_embd}], got {x.shape}")
    if x.shape[0] == 0:
        raise ValueError("hidden states hold no tokens")
    if not np.isfinite(x).all():
        raise ValueError("hidden states hold NaN or inf")
    return np.ascontiguousarray(x)
