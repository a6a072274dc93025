"""The device side of the scheduler: buffers, streams, copies and kernel launches.

Copies run on ``copy_stream``; after each range of experts (all of the
layer's tensors for that range) an event is recorded. Kernels run on
``compute_stream``; with ``overlap`` each group of experts waits only for the
event of the range that brought it, so the first experts compute while later
ones are still crossing the link. Before a round overwrites slots, the copy
stream waits for the compute already enqueued (a slot may still be read).
"""
from __future__ import annotations

import time

import numpy as np
from numba import cuda

from quant.types import type_name

from . import kernels
from .transfer import HostMemory, device_buffer


class DeviceEngine:
    def __init__(self, layers, n_slots, *, host="auto", tiles=None):
        self.layers = layers
        first = layers[0]
        for t in (first.gate, first.up, first.down):
            if int(t.ggml_type) not in kernels.SUPPORTED:
                raise ValueError(f"the CUDA kernels read {', '.join(type_name(s) for s in kernels.SUPPORTED)} "
                                 f"experts, not {type_name(t.ggml_type)}; use device='cpu' for this model")
        self.n_embd, self.n_ff, self.k = first.n_embd, first.n_ff, first.k
        self.tiles = tiles or kernels.TileConfig()
        # Host arrays: every layer's copied tensors, layer by layer, in copy order.
        roles = first.copied()
        self.host = HostMemory([c.host for L in layers for c in L.copied()], mode=host)
        self._index = {id(L): i for i, L in enumerate(layers)}
        self.n_slots = n_slots
        self.dev = []  # per role: (flat device buffer, elements per expert, shaped view for kernels)
        for c in roles:
            per = c.slab_bytes // c.host.itemsize
            flat = device_buffer(n_slots * per, c.host.dtype)
            self.dev.append((flat, per, flat.reshape((n_slots,) + c.host.shape[1:])))
        self._views = {c.role: view for c, (_, _, view) in zip(roles, self.dev)}
        self.copy_stream = cuda.stream()
        self.compute_stream = cuda.stream()
        self._scratch = {}

    def close(self):
        self.host.close()

    def _buffers(self, T):
        if T not in self._scratch:
            k, D, F = self.k, self.n_embd, self.n_ff
            self._scratch = {T: (cuda.device_array((T * k, F), np.float32),
                                 cuda.device_array((T * k, D), np.float32),
                                 cuda.device_array((T, D), np.float32))}
        return self._scratch[T]

    def copy_range(self, layer_pos, first, last, dst_slot):
        """Every tensor's experts ``first..last`` into slots from ``dst_slot``, on the copy stream."""
        n_roles = len(self.dev)
        for r, (flat, per, _) in enumerate(self.dev):
            self.host.copy(layer_pos * n_roles + r, flat, int(first) * per, int(dst_slot) * per,
                           (int(last) - int(first) + 1) * per, self.copy_stream)

    def run(self, L, x, weights, bk, rounds, *, overlap, times):
        pos = self._index[id(L)]
        cs, ps = self.copy_stream, self.compute_stream
        T = x.shape[0]
        act_d, y_d, out_d = self._buffers(T)
        x_d = cuda.to_device(x, stream=ps)
        w_d = cuda.to_device(weights, stream=ps)
        bk_d = kernels.DeviceBuckets.from_host(bk, stream=ps, check=False)  # the scheduler's own buckets
        bs = bk.block_size
        tile_of = bk.offsets // bs  # first tile of each expert; tile_of[e+1] ends it
        spans = []  # (start, end) event pairs of every round's copies and kernels, timed at the end
        t_host = time.perf_counter()
        for rnd in rounds:
            # The copy stream must not overwrite slots that enqueued kernels still read.
            _event(ps).wait(cs)
            slots_d = cuda.to_device(rnd.slot_map, stream=ps)
            c0 = _event(cs)
            events = []
            for f, l, s in zip(rnd.first.tolist(), rnd.last.tolist(), rnd.dst_slot.tolist()):
                self.copy_range(pos, f, l, s)
                events.append((f, l, _event(cs)))
            spans.append(("copy", c0, _event(cs)))
            k0 = _event(ps)
            for t_lo, t_hi, ev in _groups(rnd.experts, tile_of, events, overlap):
                if ev is not None:
                    ev.wait(ps)
                if t_hi > t_lo:
                    self._launch(L, x_d, w_d, bk_d, t_lo, t_hi, slots_d, act_d, y_d, T)
            spans.append(("compute", k0, _event(ps)))
        kernels.moe_reduce(y_d, out_d, self.k, stream=ps)
        out = out_d.copy_to_host(stream=ps)
        t_wait = time.perf_counter()
        ps.synchronize()
        cs.synchronize()
        t_end = time.perf_counter()
        times["wait"] += t_end - t_wait
        for step, a, b in spans:
            ms = a.elapsed_time(b)
            # The simulator has no device clock (-1): it copies and computes while
            # enqueueing, so the host time of the whole call is all there is.
            times[step] += ms / 1e3 if ms >= 0 else (t_wait - t_host) / len(spans)
        return out

    def _launch(self, L, x_d, w_d, bk_d, t_lo, t_hi, slots_d, act_d, y_d, T):
        v = self._views
        kernels.moe_launch(x_d, bk_d, t_lo, t_hi, slots_d, v["gate"], v["up"], v["down"],
                           v.get("gate_b"), v.get("up_b"), v.get("down_b"), w_d, act_d, y_d,
                           n_embd=self.n_embd, n_ff=self.n_ff, k=self.k, activation=L.activation,
                           tiles=self.tiles, stream=self.compute_stream)


def _event(stream):
    ev = cuda.event()
    ev.record(stream)
    return ev


def _groups(experts, tile_of, events, overlap):
    """Tile ranges to launch, each with the event it waits for (None: already resident).

    ``experts`` is sorted; runs of experts that share a copy event (or that are
    all hits) become one launch. Without overlap, one launch after the last event.
    """
    if not overlap:
        last_ev = events[-1][2] if events else None
        return [(int(tile_of[experts[0]]), int(tile_of[experts[-1] + 1]), last_ev)] if experts.size else []
    out = []
    ei = 0
    cur_lo = cur_ev = None
    prev = None
    for e in experts.tolist():
        while ei < len(events) and events[ei][1] < e:
            ei += 1
        ev = events[ei][2] if ei < len(events) and events[ei][0] <= e <= events[ei][1] else None
        if cur_lo is None or ev is not cur_ev:
            if cur_lo is not None:
                out.append((int(tile_of[cur_lo]), int(tile_of[prev + 1]), cur_ev))
            cur_lo, cur_ev = e, ev
        prev = e
    if cur_lo is not None:
        out.append((int(tile_of[cur_lo]), int(tile_of[prev + 1]), cur_ev))
    return out
