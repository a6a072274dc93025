"""The device side of the scheduler: buffers, streams, copies and kernel launches.

A round's copy rows ``(first, last, dst_slot)`` (expert units, from the copy
plan) are executed as they are: for each row, each of the layer's tensors
``host[first*per : (last+1)*per] -> dev[dst_slot*per : ...]`` on
``copy_stream``, then an event. The engine counts what it enqueued (copies and
bytes per tensor) and returns it: the statistics record that, not the plan.

Kernels run on ``compute_stream`` in waves: runs of experts whose tiles give
enough blocks to fill the GPU (``WAVE_BLOCKS_PER_SM`` per SM), each wave waiting
only on the last copy event its experts need, so the first experts compute
while later ones are still crossing the link, and no launch leaves most of the
GPU idle. ``launch_tiles=1`` gives one launch per copy range (the old way).

Where a copy costs host time (``staged``: a memcpy from the memory map into
one half of the pinned double buffer while the DMA drains the other;
``pageable``: the driver stages it), the rows run on a host thread and the
compute stream launches each wave as soon as the rows it needs are enqueued,
so host copying of later experts overlaps the kernels of earlier ones.

The copy stream waits only for what can conflict: the kernels of earlier
rounds or layers still reading the slots it will overwrite. Uploads of the
hidden states, routing weights, buckets and slot maps go on the compute stream
from pinned buffers, after the first round's copies are enqueued, so the
experts never queue behind them.

Hidden states already on the device (the device-resident model) are read in
place and the output is written into a device array: nothing waits at the end
of ``run``. The router logits are computed on the device and brought to the
host by ``route_inputs``, the one synchronisation per layer; the step times of
earlier layers, whose events are complete by then, are read there (``settle``).
"""
from __future__ import annotations

import threading
import time

import numpy as np
from numba import cuda

from quant.types import type_name

from ..kernels.cuda import experts as kernels
from . import copyplan
from .transfer import HostMemory, device_buffer


class DeviceEngine:
    def __init__(self, layers, n_slots, *, host="auto", tiles=None, launch_tiles=None, dense_tiles=None):
        self.layers = layers
        first = layers[0]
        for L in layers:
            for t in (L.gate, L.up, L.down):
                if int(t.ggml_type) not in kernels.expert_types():
                    raise ValueError(f"the CUDA kernels read {', '.join(type_name(s) for s in kernels.expert_types())}"
                                     f" experts, not {type_name(t.ggml_type)}; use device='cpu' for this model")
        assert launch_tiles is None or launch_tiles >= 1  # checked by HybridMoE
        self.n_embd, self.n_ff, self.k = first.n_embd, first.n_ff, first.k
        self.tiles = tiles or kernels.TileConfig()
        # Host arrays: every layer's copied tensors, layer by layer, in copy order.
        self.roles = first.copied()
        self.host = HostMemory([c.host for L in layers for c in L.copied()], mode=host)
        self._index = {id(L): i for i, L in enumerate(layers)}
        self.n_slots = n_slots
        # Per role one flat buffer of n_slots experts of the largest layer's size. Layers may hold
        # other types in a role (Q4_K_M: Q6_K for some ffn_down), so each layer gets its own
        # elements per expert and kernel views of the front of the buffers (HybridMoE keeps a
        # cache, whose slots outlive a layer, to files of one layout).
        self._per, self._views = {}, {}
        for L in layers:
            cs = L.copied()
            if [(c.role, c.host.dtype) for c in cs] != [(c.role, c.host.dtype) for c in self.roles]:
                raise ValueError(f"block {L.index}: expert tensors stored as {[str(c.host.dtype) for c in cs]}, "
                                 f"block {first.index} as {[str(c.host.dtype) for c in self.roles]}: "
                                 f"one element type per role on the device; use device='cpu'")
            self._per[id(L)] = [c.slab_bytes // c.host.itemsize for c in cs]
        flats = [device_buffer(n_slots * max(p[r] for p in self._per.values()), c.host.dtype)
                 for r, c in enumerate(self.roles)]
        for L in layers:
            self._views[id(L)] = {c.role: flat[:n_slots * per].reshape((n_slots,) + c.host.shape[1:])
                                  for c, flat, per in zip(L.copied(), flats, self._per[id(L)])}
        # per role: (flat device buffer, elements per slot of the first layer, its kernel view)
        self.dev = [(flat, per, self._views[id(first)][c.role])
                    for c, flat, per in zip(self.roles, flats, self._per[id(first)])]
        self._device_id = getattr(cuda.get_current_device(), "id", None) or 0  # (the simulator's has none)
        self.copy_stream = cuda.stream()
        self.compute_stream = cuda.stream()
        # Routers for the logits of hidden states on the device: the dense device matmul (F32).
        self.routers = [router_on_device(L, self.compute_stream, dense_tiles) for L in layers]
        self._scratch = {}
        self._pending = []  # (times, spans, t_host, t_done) of runs whose events are not read yet
        self.launch_tiles = launch_tiles or fill_tiles(self.tiles, self.n_ff, _sm_count())

    def close(self):
        self.host.close()

    def _buffers(self, T):
        """Device scratch and pinned upload buffers for ``T`` tokens (kept for the last T).

        Uploads copy into preallocated device arrays (no allocation, which could
        synchronise the device, per ubatch); each round gets its own slot-map pair,
        since a pinned buffer must not be rewritten before its copy has run.
        """
        if T not in self._scratch:
            self.compute_stream.synchronize()  # async copies may still read the buffers dropped here
            E = self.layers[0].n_experts
            shapes = scratch_shapes(T, self.k, self.n_embd, self.n_ff, E, self.tiles.block_pairs)
            alloc = {"dev": lambda s, t: cuda.device_array(s, t), "pin": lambda s, t: cuda.pinned_array(s, t),
                     "pair": lambda s, t: (cuda.pinned_array(s, t), cuda.device_array(s, t))}
            self._scratch = {T: {name: alloc[kind](shape, dt) for name, (kind, shape, dt) in shapes.items()}}
            self._scratch[T]["slots"] = []
        return self._scratch[T]

    def _slot_map(self, buf, i, slot_map):
        while len(buf["slots"]) <= i:
            n = slot_map.shape[0]
            buf["slots"].append((cuda.pinned_array(n, np.int32), cuda.device_array(n, np.int32)))
        return _upload(buf["slots"][i], slot_map, self.compute_stream)

    def _copy_rows_on_device(self, *args):
        # A new thread has no current CUDA context: numba would attach device 0, not this one.
        with cuda.gpus[self._device_id]:
            self._copy_rows(*args)

    def _copy_rows(self, layer_pos, first, last, dst_slot, enqueued, rows):
        """Execute copy-plan rows: every tensor's experts ``first..last`` into slots from
        ``dst_slot``, on the copy stream; after each row its event goes to ``rows``, and
        what was enqueued is counted into ``enqueued`` ([tensor] -> [copies, bytes])."""
        n_roles = len(self.dev)
        try:
            pers = self._per[id(self.layers[layer_pos])]
            rows_of = [copyplan.extents(first, last, dst_slot, per) for per in pers]  # elements
            for i in range(first.size):
                for r, (flat, _, _) in enumerate(self.dev):
                    src, dst, n = (int(a[i]) for a in rows_of[r])
                    nbytes = self.host.copy(layer_pos * n_roles + r, flat, src, dst, n, self.copy_stream)
                    enqueued[r, 0] += 1
                    enqueued[r, 1] += nbytes
                rows.put(i, _event(self.copy_stream))
            rows.finish(_event(self.copy_stream))
        except BaseException as e:  # handed to the thread that waits on the rows
            rows.fail(e)

    def route_inputs(self, L, x, with_x):
        """The router logits ``x @ router_w.T`` (float32 [T, E], no bias) of hidden states ``x``
        on the device, and ``x`` itself when ``with_x`` (the CPU expert path), on the host.

        This is the one synchronisation per layer, as in llama.cpp: top-k and the copy plan
        run on the host and need the logits; everything else stays on the device. The
        arrays returned are pinned buffers, valid until the next call."""
        ps = self.compute_stream
        T = x.shape[0]
        buf = self._buffers(T)
        logits_h, logits_d = buf["logits"]
        self.routers[self._index[id(L)]].matmul(x, out=logits_d, stream=ps)
        logits_d.copy_to_host(logits_h, stream=ps)
        if with_x:
            x.copy_to_host(buf["x"][0], stream=ps)
        wait = self.settle()
        return logits_h, buf["x"][0] if with_x else None, wait

    def upload(self, out_h, out):
        """A result computed on the host into the device array ``out``, async on the compute stream."""
        pinned = self._buffers(out_h.shape[0])["out_h"]
        pinned[...] = out_h
        out.copy_to_device(pinned, stream=self.compute_stream)
        return out

    def settle(self) -> float:
        """Wait for both streams, then read the step times of the runs not read yet; returns
        the seconds waited."""
        t_wait = time.perf_counter()
        self.compute_stream.synchronize()
        self.copy_stream.synchronize()
        waited = time.perf_counter() - t_wait
        for times, spans, t_host, t_done in self._pending:
            for step, a, b in spans:
                ms = a.elapsed_time(b)
                # The simulator has no device clock (-1): it copies and computes while
                # enqueueing, so the host time of the whole call is all there is.
                times[step] += ms / 1e3 if ms >= 0 else (t_done - t_host) / len(spans)
        self._pending.clear()
        return waited

    def run(self, L, x, weights, bk, rounds, *, overlap, times, out=None):
        """Copy and compute every round; returns ``(out float32 [T, n_embd], enqueued int64 [tensors, 2])``
        where ``enqueued[r] = (copies, bytes)`` of the layer's tensor ``r`` (``L.copied()`` order).

        ``x`` numpy: uploaded here, and the output comes back as a new numpy array after
        both streams are done. ``x`` a device array (on the compute stream): read in place,
        the output reduced into the device array ``out``, and nothing waits; ``times`` are
        filled at the next ``settle``."""
        pos = self._index[id(L)]
        cs, ps = self.copy_stream, self.compute_stream
        T = x.shape[0]
        buf = self._buffers(T)
        enqueued = np.zeros((len(self.dev), 2), np.int64)
        tile_of = bk.offsets // bk.block_size  # first tile of each expert; tile_of[e+1] ends it
        spans = []  # (step, start, end) events of every round's copies and kernels, timed at the end
        t_host = time.perf_counter()
        uploaded = None
        threaded = self.host.host_copies  # copies that cost host time
        for i, rnd in enumerate(rounds):
            # The copy stream must not overwrite slots that enqueued kernels still read
            # (earlier rounds, earlier layers); the uploads below are not among them.
            _event(ps).wait(cs)
            c0 = _event(cs)
            rows = _Rows(rnd.first.size)
            args = (pos, rnd.first, rnd.last, rnd.dst_slot, enqueued, rows)
            worker = threading.Thread(target=self._copy_rows_on_device, args=args, daemon=True) if threaded else None
            if worker:
                worker.start()
            else:
                self._copy_rows(*args)
            try:
                if uploaded is None:  # after the first copies are enqueued: they never wait for these
                    uploaded = self._upload(buf, x, weights, bk)
                slots_d = self._slot_map(buf, i, rnd.slot_map)
                k0 = _event(ps)
                ranges = [(f, l, j) for j, (f, l) in enumerate(zip(rnd.first.tolist(), rnd.last.tolist()))]
                for t_lo, t_hi, need in waves(rnd.experts, tile_of, ranges, overlap, self.launch_tiles):
                    if need is not None:
                        rows.get(need).wait(ps)  # the row's event, once the copy thread has recorded it
                    if t_hi > t_lo:
                        self._launch(L, uploaded, t_lo, t_hi, slots_d, buf, T)
                spans.append(("compute", k0, _event(ps)))
            finally:
                if worker:
                    worker.join()  # this round's copies are all enqueued before the next touches the stream
            spans.append(("copy", c0, rows.get_end()))
        on_device = out is not None
        kernels.moe_reduce(buf["y"], out if on_device else buf["out"], self.k, stream=ps)
        if not on_device:
            buf["out"].copy_to_host(buf["out_h"], stream=ps)
        self._pending.append((times, spans, t_host, time.perf_counter()))
        if on_device:
            return out, enqueued
        times["wait"] += self.settle()
        return buf["out_h"].copy(), enqueued

    def _upload(self, buf, x, weights, bk):
        """Hidden states (unless already on the device), routing weights and buckets to the
        device on the compute stream, via pinned buffers."""
        ps = self.compute_stream
        P, nt = bk.pairs.shape[0], bk.tile_expert.shape[0]
        x_d = _upload(buf["x"], x, ps) if isinstance(x, np.ndarray) else x
        w_d = _upload(buf["w"], weights.reshape(-1), ps)
        pairs = _upload(buf["pairs"], bk.pairs, ps, P)
        tile_expert = _upload(buf["tile_expert"], bk.tile_expert, ps, nt)
        return x_d, w_d, kernels.DeviceBuckets(bk, pairs, tile_expert)

    def _launch(self, L, uploaded, t_lo, t_hi, slots_d, buf, T):
        v = self._views[id(L)]
        x_d, w_d, bk_d = uploaded
        kernels.moe_launch(x_d, bk_d, t_lo, t_hi, slots_d, v["gate"], v["up"], v["down"],
                           v.get("gate_b"), v.get("up_b"), v.get("down_b"), w_d, buf["act"], buf["y"],
                           n_embd=self.n_embd, n_ff=self.n_ff, k=self.k, activation=L.activation,
                           tiles=self.tiles, gate_type=L.gate.ggml_type, down_type=L.down.ggml_type,
                           stream=self.compute_stream)


def scratch_shapes(T, k, n_embd, n_ff, n_experts, block_pairs) -> dict:
    """The buffers ``DeviceEngine`` keeps for ubatches of ``T`` tokens: name -> (kind, shape,
    dtype), kind ``dev`` (device), ``pin`` (pinned host) or ``pair`` (pinned upload buffer and
    its device twin). Slot maps (int32 [n_experts], a pair per round) come on top."""
    P = T * k + n_experts * (block_pairs - 1)  # pairs padded to whole tiles, at most
    f32, i32 = np.float32, np.int32
    return dict(act=("dev", (T * k, n_ff), f32), y=("dev", (T * k, n_embd), f32), out=("dev", (T, n_embd), f32),
                out_h=("pin", (T, n_embd), f32), x=("pair", (T, n_embd), f32), logits=("pair", (T, n_experts), f32),
                w=("pair", (T * k,), f32), pairs=("pair", (P,), i32), tile_expert=("pair", (P // block_pairs,), i32))


def scratch_device_bytes(T, k, n_embd, n_ff, n_experts, block_pairs, n_rounds=1) -> int:
    """Device bytes of ``scratch_shapes`` and ``n_rounds`` slot maps (VRAM accounting)."""
    shapes = scratch_shapes(T, k, n_embd, n_ff, n_experts, block_pairs).values()
    return (sum(int(np.prod(s)) * np.dtype(t).itemsize for kind, s, t in shapes if kind != "pin")
            + n_rounds * n_experts * 4)


class _Rows:
    """The events of a round's copy rows as the copy thread records them; ``get`` blocks
    until row ``i``'s event exists (an event waited on before it is recorded would
    not order anything) and re-raises the copy thread's error."""

    def __init__(self, n):
        self._events = [None] * n
        self._end = None
        self._error = None
        self._cond = threading.Condition()

    def put(self, i, ev):
        with self._cond:
            self._events[i] = ev
            self._cond.notify_all()

    def finish(self, ev):
        with self._cond:
            self._end = ev
            self._cond.notify_all()

    def fail(self, e):
        with self._cond:
            self._error = e
            self._cond.notify_all()

    def _wait(self, ready):
        with self._cond:
            self._cond.wait_for(lambda: self._error is not None or ready())
            if self._error is not None:
                raise self._error

    def get(self, i):
        self._wait(lambda: self._events[i] is not None)
        return self._events[i]

    def get_end(self):
        self._wait(lambda: self._end is not None)
        return self._end


def _upload(pair, host, stream, n=None):
    """``host`` -> the pinned buffer -> its device twin (the first ``n`` elements), async on ``stream``."""
    pinned, dev = pair
    if n is not None:
        pinned, dev = pinned[:n], dev[:n]
    pinned[...] = host
    dev.copy_to_device(pinned, stream=stream)
    return dev


def router_dense(L):
    """Layer ``L``'s router weight (float32 [E, n_embd]) as a dense F32 weight."""
    from gguf.constants import GGMLQuantizationType as T

    from ..kernels.cpu.dense import Dense
    return Dense(L.tensor_names()["router_w"], L.router_w, T.F32, L.router_w.shape)


def router_on_device(L, stream=0, tiles=None):
    """The router of ``L`` on the device (``DeviceDense``): the logits of device hidden states."""
    from ..kernels.cuda.dense import DeviceDense
    return DeviceDense(router_dense(L), stream=stream, tiles=tiles)


def _event(stream):
    ev = cuda.event()
    ev.record(stream)
    return ev


def _sm_count() -> int:
    try:
        return int(cuda.get_current_device().MULTIPROCESSOR_COUNT)
    except Exception:  # the simulator's device has no attributes
        return 1


def fill_tiles(tiles: kernels.TileConfig, n_cols: int, n_sms: int) -> int:
    """Tiles per launch that give every SM ``WAVE_BLOCKS_PER_SM`` blocks of the gate+up kernel
    (``n_cols`` output columns: ``ceil(n_cols / block_cols)`` blocks per tile)."""
    col_blocks = -(-n_cols // tiles.block_cols)
    return max(1, -(-n_sms * kernels.WAVE_BLOCKS_PER_SM // col_blocks))


def waves(experts, tile_of, events, overlap, min_tiles):
    """Tile ranges to launch, each with the copy event it waits for (None: all resident).

    ``experts`` is sorted; ``events`` is ``[(first, last, event)]`` (an event or
    a token for one, such as the row's index) in the order
    the copies were enqueued (ascending experts). A wave is a run of experts
    holding at least ``min_tiles`` tiles, cut only where the copy event changes,
    and waits for the last event any of its experts needs (the copy stream is in
    order, so the earlier ones are done too). Without overlap: one launch after
    the last event.
    """
    if not experts.size:
        return []
    if not overlap:
        last_ev = events[-1][2] if events else None
        return [(int(tile_of[experts[0]]), int(tile_of[experts[-1] + 1]), last_ev)]
    out = []
    ei = 0
    lo = need = need_ev = cur_ev = None
    prev = None
    for e in experts.tolist():
        while ei < len(events) and events[ei][1] < e:
            ei += 1
        idx = ei if ei < len(events) and events[ei][0] <= e <= events[ei][1] else None
        ev = events[idx][2] if idx is not None else None
        if lo is not None and ev is not cur_ev and tile_of[prev + 1] - tile_of[lo] >= min_tiles:
            out.append((int(tile_of[lo]), int(tile_of[prev + 1]), need_ev))
            lo = need = need_ev = None
        if lo is None:
            lo = e
        if idx is not None and (need is None or idx > need):
            need, need_ev = idx, ev
        cur_ev = ev
        prev = e
    out.append((int(tile_of[lo]), int(tile_of[prev + 1]), need_ev))
    return out
