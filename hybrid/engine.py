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

from . import kernels
from .transfer import HostMemory, device_buffer


class DeviceEngine:
    def __init__(self, layers, roles, n_slots, *, host="auto", tiles=None):
        self.layers = layers
        self.roles = [(name, nbytes) for name, nbytes, _ in roles]
        first = layers[0]
        self.n_embd, self.n_ff, self.k = first.n_embd, first.n_ff, first.k
        self.tiles = tiles or kernels.TileConfig()
        # Host arrays: every layer's tensors, role by role, as flat views.
        from .scheduler import _roles
        arrays = [arr for L in layers for _, _, arr in _roles(L)]
        self.host = HostMemory(arrays, mode=host)
        self._index = {id(L): i for i, L in enumerate(layers)}
        self.n_slots = n_slots
        self.dev = []  # per role: (flat device buffer, elements per expert, shaped view for kernels)
        for (name, nbytes, arr) in roles:
            per = nbytes // arr.itemsize
            flat = device_buffer(n_slots * per, arr.dtype)
            self.dev.append((flat, per, flat.reshape((n_slots,) + arr.shape[1:])))
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
        n_roles = len(self.roles)
        for r, (flat, per, _) in enumerate(self.dev):
            self.host.copy(layer_pos * n_roles + r, flat, int(first) * per, int(dst_slot) * per,
                           (int(last) - int(first) + 1) * per, self.copy_stream)

    def run(self, L, x, weights, bk, rounds, *, overlap, times):
        pos = self._index[id(L)]
        cs, ps = self.copy_stream, self.compute_stream
        T = x.shape[0]
        act_d, y_d, out_d = self._buffers(T)
        t0 = time.perf_counter()
        x_d = cuda.to_device(x, stream=ps)
        w_d = cuda.to_device(weights, stream=ps)
        bk_d = kernels.DeviceBuckets.from_host(bk, stream=ps)
        bs = bk.block_size
        tile_of = bk.offsets // bs  # first tile of each expert; tile_of[e+1] ends it
        t_copy = t_comp = 0.0
        for rnd in rounds:
            # The copy stream must not overwrite slots that enqueued kernels still read.
            done = cuda.event()
            done.record(ps)
            done.wait(cs)
            slots_d = cuda.to_device(rnd.slot_map, stream=ps)
            ta = time.perf_counter()
            events = []
            for f, l, s in zip(rnd.first.tolist(), rnd.last.tolist(), rnd.dst_slot.tolist()):
                self.copy_range(pos, f, l, s)
                ev = cuda.event()
                ev.record(cs)
                events.append((f, l, ev))
            tb = time.perf_counter()
            t_copy += tb - ta
            for t_lo, t_hi, ev in _groups(rnd.experts, tile_of, events, overlap):
                if ev is not None:
                    ev.wait(ps)
                if t_hi > t_lo:
                    self._launch(L, x_d, w_d, bk_d, t_lo, t_hi, slots_d, act_d, y_d, T)
            t_comp += time.perf_counter() - tb
        kernels.moe_reduce(y_d, out_d, self.k, stream=ps)
        out = out_d.copy_to_host(stream=ps)
        tw = time.perf_counter()
        ps.synchronize()
        cs.synchronize()
        times["copy"] += t_copy
        times["compute"] += t_comp
        times["wait"] += time.perf_counter() - tw
        return out

    def _launch(self, L, x_d, w_d, bk_d, t_lo, t_hi, slots_d, act_d, y_d, T):
        (g, _, gv), (u, _, uv), (d, _, dv) = self.dev[:3]
        bias = {name: view for (name, _), (_, _, view) in zip(self.roles, self.dev) if name.endswith("_b")}
        kernels.moe_launch(x_d, bk_d, t_lo, t_hi, slots_d, gv, uv, dv,
                           bias.get("gate_b"), bias.get("up_b"), bias.get("down_b"), w_d, act_d, y_d,
                           n_embd=self.n_embd, n_ff=self.n_ff, k=self.k, activation=L.activation,
                           tiles=self.tiles, stream=self.compute_stream)


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
