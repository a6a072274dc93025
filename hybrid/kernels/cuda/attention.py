"""Attention over the KV cache on the device (numba-cuda): the GPU twin of ``KVCache`` + ``ops.attention``.

``DeviceKVCache`` keeps K and V of past positions per layer in device memory,
float32, with the sizes and ring layout of the host ``KVCache`` (both take them
from ``hybrid.model.kvcache.kv_sizes``): full layers hold ``n_ctx`` positions, sliding-window
layers a ring of ``n_swa + n_ubatch`` slots, position p in slot ``p % size``.

``attention`` is flash attention on CUDA cores (float32 FFMA, no tensor cores):

- Rows. The queries of one KV head group, T tokens x r = n_head / n_head_kv
  heads, are flattened into T * r rows (row i: token i // r, head g * r + i % r).
  A block takes a tile of ``rows`` of them, so the r heads sharing a KV head
  read each K/V tile from shared memory once.
- Keys. The block loops over tiles of ``keys`` keys, only over the range some
  row of its tile can see (causal end; on sliding-window layers the window
  start of its first token), reading position p from ring slot ``p % size``.
  Per key tile: K and V into shared memory; the scores S = (scale q) K^T of the
  tile into shared memory (each thread a ``thread_rows x thread_keys`` block of
  it, masked to -inf as ``ops.attention`` masks); then each row's ``lanes``
  threads (each owning every lanes-th output column) take the tile's row max,
  rescale their accumulator and running sum by exp(m_old - m_new) and add
  exp(s - m_new) V. The T x n_keys score matrix never exists: shared memory
  holds the Q, K, V and S tiles, sized by tiles and head dims, never by the context.
- Sinks: one extra logit per head that takes probability and carries no
  value: the running max and sum start from it (max = sink, sum = 1).
- Decode and short ubatches (flash-decoding). A T=1 step has r rows per KV
  head (8 for gpt-oss), too few for a 128-thread block and too few blocks for
  a GPU. Up to ``narrow_rows`` rows take the ``narrow`` tiles (8 rows x 16
  keys, one warp), and whenever the row tiles give fewer than ``target_blocks`` blocks the
  key range of each is split into up to ``MAX_SPLITS`` contiguous parts of at
  least ``split_keys`` keys, one block each (grid z). Every split writes its
  unnormalised accumulator, max and sum to a scratch buffer in the cache, and a
  second kernel merges them per row (rescaling each by exp(m_split - m), the
  sink added once there). A decode step at 128k context: 64 splits x 8 KV
  heads = 512 one-warp blocks of 2,048 keys each. (r = 8 in gpt-oss and
  qwen3moe-30B fills the 8 rows; a model with r < 8 leaves 8 - r idle.)

All launches of one cache share its split scratch: run them on one stream, in
order (layers are). Shapes, dtypes, positions and the stored range are checked
on the host before any launch (Numba does no bounds checks).

Over 500 lines: the cache, the kernels and the launch plan are one contract (the
split layout of the scratch, the ring slots the kernel reads) and change together.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace

import numpy as np
from numba import cuda, types

from quant import cuda as qc

from .tiles import Variant
from .ops import check_device

__all__ = ["DeviceKVCache", "attention", "AttentionTiles", "AttentionConfig", "LaunchPlan", "launch_plan",
           "MAX_SPLITS"]

_U = np.uint64
_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_NEG_INF = np.float32(-np.inf)
_SMEM_LIMIT = 48 * 1024  # static shared memory per block
# Most key splits of one launch; the cache's scratch holds this many partial rows per head
# (64 x n_head x (head_dim_v + 2) floats: 1 MiB at gpt-oss shapes).
MAX_SPLITS = 64
_COMBINE_THREADS = 32


# ------------------------------------------------------------------ tile sizes

@dataclass(frozen=True)
class AttentionTiles:
    """One block's tiling (compile-time constants; one build per tiles and head dims).

    rows: query rows (token x head of one KV group) per block. keys: keys per shared tile.
    thread_rows x thread_keys: the block of scores one thread computes (strided, so
    threads side by side read different K rows and a warp's reads spread over banks).
    threads = (rows / thread_rows) * (keys / thread_keys); each row's output is
    shared by ``lanes = threads / rows`` threads, every lanes-th column each.
    """

    rows: int = 32
    keys: int = 32
    thread_rows: int = 2
    thread_keys: int = 4

    def __post_init__(self):
        for name in ("rows", "keys", "thread_rows", "thread_keys"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"AttentionTiles.{name} must be a positive int, got {v!r}")
        if self.rows % self.thread_rows or self.keys % self.thread_keys:
            raise ValueError("AttentionTiles: rows must be a multiple of thread_rows and keys of thread_keys")
        if self.threads % self.rows or not 1 <= self.threads <= 1024:
            raise ValueError(f"AttentionTiles gives {self.threads} threads for {self.rows} rows "
                             "(need a multiple of rows, at most 1024)")

    @property
    def threads(self) -> int:
        return (self.rows // self.thread_rows) * (self.keys // self.thread_keys)

    @property
    def lanes(self) -> int:
        return self.threads // self.rows

    def shared_bytes(self, d: int, dv: int) -> int:
        """Shared memory: Q [rows][d+1], K [keys][d+1], V [keys][dv], S [rows][keys+1]."""
        return 4 * ((self.rows + self.keys) * (d + 1) + self.keys * dv + self.rows * (self.keys + 1))

    def fit(self, d: int, dv: int) -> "AttentionTiles":
        """These tiles, or with key tiles halved (same threads) until they fit in shared memory."""
        t = self
        while t.shared_bytes(d, dv) > _SMEM_LIMIT:
            if t.keys % 2 or t.thread_keys % 2:
                raise ValueError(f"head dims {d}/{dv} need {t.shared_bytes(d, dv)} B of shared memory "
                                 f"with tiles {t} (> {_SMEM_LIMIT})")
            t = replace(t, keys=t.keys // 2, thread_keys=t.thread_keys // 2)
        return t


@dataclass(frozen=True)
class AttentionConfig:
    """Which tiles a launch takes and when keys are split.

    wide: prompt ubatches (32 rows x 32 keys, 128 threads; 29 KB of shared memory at
    head_dim 64, keys halved at 128). narrow: up to ``narrow_rows`` rows, decode steps
    and short ubatches (8 rows: a gpt-oss decode step's 8 heads of one KV head; 16 keys,
    one warp; 11 KB of shared memory at head_dim 64, so many blocks share an SM).
    target_blocks: fewer blocks than this and the keys are split (about 4 one-warp
    blocks per SM of a 132-SM H100/H200). split_keys: fewest keys per split, so a
    split's partial row (dv + 2 floats, written and merged) costs little against its keys.
    """

    wide: AttentionTiles = field(default_factory=AttentionTiles)
    narrow: AttentionTiles = field(default_factory=lambda: AttentionTiles(rows=8, keys=16, thread_rows=2,
                                                                          thread_keys=2))
    narrow_rows: int = 64
    target_blocks: int = 512
    split_keys: int = 256

    def __post_init__(self):
        for name in ("narrow_rows", "target_blocks", "split_keys"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"AttentionConfig.{name} must be a positive int, got {v!r}")


# ------------------------------------------------------------------ kernels

@functools.lru_cache(maxsize=None)
def _key_loader(D, ROW_WORDS, THREADS):
    """Device function copying the ``n_k`` keys (or values) from ``kp0`` on of KV head ``g``,
    ring slots ``slot0, slot0 + 1, ...`` wrapping at ``size``, into shared rows of ROW_WORDS
    words at ``offs``. Consecutive threads take consecutive columns: global reads coalesce.
    Rows past ``n_k`` are left as they are: no score or value of them is used."""
    @cuda.jit(device=True, inline=True)
    def load(src, g, slot0, size, n_k, sm, offs, tid):
        for idx in range(_U(tid), _U(n_k * D), _U(THREADS)):
            kk = idx // _U(D)
            c = idx - kk * _U(D)
            slot = _U(slot0) + kk
            if slot >= _U(size):
                slot -= _U(size)
            sm[_U(offs) + kk * _U(ROW_WORDS) + c] = src[slot, g, c]
    return load


@functools.lru_cache(maxsize=None)
def _attention_kernel(tiles: AttentionTiles, D: int, DV: int):
    BM, BK, TM, TK = tiles.rows, tiles.keys, tiles.thread_rows, tiles.thread_keys
    THREADS, LANES = tiles.threads, tiles.lanes
    ROW_STRIDE, KEY_STRIDE = BM // TM, BK // TK
    ACC = -(-DV // LANES)  # output columns per thread
    SCORES = TM * TK  # scores per thread and key tile
    # Shared tiles (words). Q and K rows are D + 1 words: the score loop reads one
    # column of several rows at once, an odd stride puts them in different banks.
    QK_WORDS, S_WORDS = D + 1, BK + 1
    offs_q = 0
    offs_k = offs_q + BM * QK_WORDS
    offs_v = offs_k + BK * QK_WORDS
    offs_s = offs_v + BK * DV
    WORDS = offs_s + BM * S_WORDS
    assert 4 * WORDS == tiles.shared_bytes(D, DV)  # what the launch asks for

    load_k = _key_loader(D, QK_WORDS, THREADS)
    load_v = _key_loader(DV, DV, THREADS)

    @cuda.jit
    def attend(q, kc, vc, pos0, n_swa, scale, sinks, has_sinks, out, part_acc, part_m, part_l):
        """Tiling: block (blockIdx.x, y, z) = (tile of BM rows of KV group y, key split z).
        The Q tile (scaled) sits in shared memory for the whole loop; per key tile of BK,
        K and V are gathered from their ring slots, each thread computes TM x TK scores
        at rows ty + i*ROW_STRIDE, keys tx + j*KEY_STRIDE into S, then the LANES threads
        of row rr = tid // LANES update its running max, sum and ACC output columns
        lane + a*LANES. One split: the final, normalised rows; several: partial rows."""
        T, H = q.shape[0], q.shape[1]
        size, n_kv = kc.shape[0], kc.shape[1]
        r = H // n_kv
        n_rows = T * r
        g = cuda.blockIdx.y
        split, n_splits = cuda.blockIdx.z, cuda.gridDim.z
        row0 = cuda.blockIdx.x * BM
        tid = cuda.threadIdx.x
        # Dynamic shared memory (launched with WORDS words): the simulator creates a static
        # shared array racily (two threads of a block can get different ones).
        sm = cuda.shared.array(0, types.float32)

        # The keys some row of this tile can see, then this split's part of them (whole tiles).
        t_first = row0 // r
        t_last = min(n_rows - 1, row0 + BM - 1) // r
        k_hi = pos0 + t_last + 1
        k_lo = max(0, pos0 + t_first - n_swa + 1) if n_swa > 0 else 0
        tiles_per_split = ((k_hi - k_lo + BK - 1) // BK + n_splits - 1) // n_splits
        k_begin = k_lo + split * tiles_per_split * BK
        k_end = min(k_hi, k_begin + tiles_per_split * BK)

        # K rows past a partial tile's keys keep the previous tile's (or these zeros): their
        # scores are masked, but never computed from uninitialised memory.
        for idx in range(tid, BK * QK_WORDS, THREADS):
            sm[offs_k + idx] = _ZERO
        cuda.syncthreads()  # before any thread loads the first keys over them
        for idx in range(tid, BM * D, THREADS):
            rr = idx // D
            c = idx - rr * D
            row = row0 + rr
            val = _ZERO
            if row < n_rows:
                t = row // r
                val = q[t, g * r + row - t * r, c] * scale
            sm[offs_q + rr * QK_WORDS + c] = val

        # The row this thread accumulates (softmax and PV phase).
        my_rr = tid // LANES
        lane = tid - my_rr * LANES
        my_row = row0 + my_rr
        row_ok = my_row < n_rows
        my_t = my_row // r
        my_h = g * r + my_row - my_t * r
        m_run = _NEG_INF
        l_run = _ZERO
        if has_sinks != 0 and n_splits == 1 and row_ok:
            m_run = sinks[my_h]
            l_run = _ONE
        s_ptr = _U(offs_s + my_rr * S_WORDS)
        v_ptr = _U(offs_v + lane)
        acc = cuda.local.array(ACC, np.float32)
        for a in range(ACC):
            acc[a] = _ZERO
        # The score block this thread computes.
        ty = tid // KEY_STRIDE
        tx = tid - ty * KEY_STRIDE
        sc = cuda.local.array(SCORES, np.float32)
        # Unsigned shared offsets: numba skips its negative-index fix-up.
        q_ptr = _U(offs_q + ty * QK_WORDS)
        k_ptr = _U(offs_k + tx * QK_WORDS)
        qa = cuda.local.array(TM, np.float32)

        for kp0 in range(k_begin, k_end, BK):
            n_k = min(BK, k_end - kp0)
            slot0 = kp0 % size
            load_k(kc, g, slot0, size, n_k, sm, offs_k, tid)
            load_v(vc, g, slot0, size, n_k, sm, offs_v, tid)
            cuda.syncthreads()

            for i in range(SCORES):
                sc[i] = _ZERO
            for c in range(D):
                for i in range(TM):
                    qa[i] = sm[q_ptr + _U(i * ROW_STRIDE * QK_WORDS + c)]
                for j in range(TK):
                    kv = sm[k_ptr + _U(j * KEY_STRIDE * QK_WORDS + c)]
                    for i in range(TM):
                        sc[i * TK + j] += qa[i] * kv
            for i in range(TM):
                rr = ty + i * ROW_STRIDE
                row = row0 + rr
                q_pos = pos0 + row // r
                for j in range(TK):
                    kk = tx + j * KEY_STRIDE
                    k_pos = kp0 + kk
                    seen = row < n_rows and kk < n_k and k_pos <= q_pos and (n_swa == 0 or q_pos - k_pos < n_swa)
                    sm[offs_s + rr * S_WORDS + kk] = sc[i * TK + j] if seen else _NEG_INF
            cuda.syncthreads()

            m_new = m_run
            for kk in range(n_k):  # keys past n_k are masked in every row
                m_new = max(m_new, sm[s_ptr + _U(kk)])
            if m_new > _NEG_INF:  # else no key of this tile is seen by the row yet
                alpha = math.exp(m_run - m_new)
                l_run *= alpha
                for a in range(ACC):
                    acc[a] *= alpha
                for kk in range(n_k):
                    p = math.exp(sm[s_ptr + _U(kk)] - m_new)
                    l_run += p
                    for a in range(ACC):
                        if lane + a * LANES < DV:
                            acc[a] += p * sm[v_ptr + _U(kk * DV + a * LANES)]
                m_run = m_new
            cuda.syncthreads()

        if row_ok:
            if n_splits == 1:
                inv = _ONE / l_run
                for a in range(ACC):
                    c = lane + a * LANES
                    if c < DV:
                        out[my_t, my_h * DV + c] = acc[a] * inv
            else:
                prow = split * T * H + my_t * H + my_h
                if lane == 0:
                    part_m[prow] = m_run
                    part_l[prow] = l_run
                for a in range(ACC):
                    c = lane + a * LANES
                    if c < DV:
                        part_acc[prow, c] = acc[a]

    return attend


@cuda.jit
def _combine_kernel(part_acc, part_m, part_l, n_splits, sinks, has_sinks, out):
    """Tiling: one block per output row (token t, head h), its threads striding over the
    dv columns. Each thread rebuilds the row's max m and sum l over the splits (and the
    sink), then out = sum_s exp(m_s - m) acc_s / l."""
    T = out.shape[0]
    DV = part_acc.shape[1]
    H = out.shape[1] // DV
    n_rows = T * H
    row = cuda.blockIdx.x
    t = row // H
    h = row - t * H
    m = sinks[h] if has_sinks != 0 else _NEG_INF
    for s in range(n_splits):
        m = max(m, part_m[s * n_rows + row])
    den = math.exp(sinks[h] - m) if has_sinks != 0 else _ZERO
    for s in range(n_splits):
        den += part_l[s * n_rows + row] * math.exp(part_m[s * n_rows + row] - m)
    inv = _ONE / den
    for c in range(cuda.threadIdx.x, DV, cuda.blockDim.x):
        val = _ZERO
        for s in range(n_splits):
            val += part_acc[s * n_rows + row, c] * math.exp(part_m[s * n_rows + row] - m)
        out[t, h * DV + c] = val * inv


_STORE_THREADS = 128


@cuda.jit
def _store_kernel(k, v, pos0, kc, vc):
    """Tiling: grid-stride over the T x n_head_kv x (head_dim + head_dim_v) values of k
    then v, one each; token t goes to ring slot (pos0 + t) % size."""
    T, n_kv, D = k.shape[0], k.shape[1], k.shape[2]
    DV = v.shape[2]
    size = kc.shape[0]
    n_k = T * n_kv * D
    for i in range(cuda.grid(1), n_k + T * n_kv * DV, cuda.gridsize(1)):
        if i < n_k:
            t = i // (n_kv * D)
            rest = i - t * n_kv * D
            g = rest // D
            kc[(pos0 + t) % size, g, rest - g * D] = k[t, g, rest - g * D]
        else:
            j = i - n_k
            t = j // (n_kv * DV)
            rest = j - t * n_kv * DV
            g = rest // DV
            vc[(pos0 + t) % size, g, rest - g * DV] = v[t, g, rest - g * DV]


# ------------------------------------------------------------------ the cache

def _int(name, v) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    return int(v)


class DeviceKVCache:
    """K and V of past positions per layer on the device, float32, the same sizes and ring layout as KVCache.

    Also holds the scratch of split launches (``MAX_SPLITS`` partial rows per head), counted
    in ``nbytes``. ``n_past`` is the caller's (as on ``KVCache``); the cache itself records per
    layer which positions its slots hold (stores end where the last one ended; a ring
    overwrites the oldest), and refuses a store that leaves a gap and an attention that
    needs a key not held.
    """

    def __init__(self, cfg, n_ctx: int, n_ubatch: int):
        self.cfg = cfg
        self.n_ctx, self.n_ubatch = _int("n_ctx", n_ctx), _int("n_ubatch", n_ubatch)
        if self.n_ctx < 1 or self.n_ubatch < 1:
            raise ValueError(f"n_ctx and n_ubatch must be positive, got {n_ctx}, {n_ubatch}")
        from ...model.kvcache import kv_sizes  # the KV layout is the model's (no import cycle: a leaf)
        self.size = kv_sizes(cfg, self.n_ctx, self.n_ubatch)
        Hkv, d, dv = cfg.n_head_kv, cfg.head_dim, cfg.head_dim_v
        self.k = [cuda.device_array((n, Hkv, d), np.float32) for n in self.size]
        self.v = [cuda.device_array((n, Hkv, dv), np.float32) for n in self.size]
        rows = MAX_SPLITS * cfg.n_head
        self.part_acc = cuda.device_array((rows, dv), np.float32)
        self.part_m = cuda.device_array(rows, np.float32)
        self.part_l = cuda.device_array(rows, np.float32)
        self.no_sinks = cuda.device_array(1, np.float32)  # stands in for sinks=None
        self.nbytes = self.nbytes_for(cfg, self.n_ctx, self.n_ubatch)
        self.n_past = 0
        # Per layer, the positions [_oldest, _stored) its slots hold: stores end at _stored,
        # and a ring's slots of older positions were overwritten by newer ones.
        self._oldest = [0] * cfg.n_layer
        self._stored = [0] * cfg.n_layer

    @staticmethod
    def nbytes_for(cfg, n_ctx: int, n_ubatch: int) -> int:
        """Device bytes a cache of this size allocates: K and V, split scratch, the sinks stand-in."""
        from ...model.kvcache import kv_nbytes
        return kv_nbytes(cfg, n_ctx, n_ubatch) + MAX_SPLITS * cfg.n_head * (cfg.head_dim_v + 2) * 4 + 4

    def clear(self):
        self.n_past = 0
        self._oldest = [0] * len(self._oldest)
        self._stored = [0] * len(self._stored)

    def _layer(self, il) -> int:
        il = _int("il", il)
        if not 0 <= il < len(self.size):
            raise ValueError(f"layer {il} outside [0, {len(self.size)})")
        return il

    def _span(self, pos0, n):
        pos0 = _int("pos0", pos0)
        if n < 1 or n > self.n_ubatch or pos0 < 0 or pos0 + n > self.n_ctx:
            raise ValueError(f"KV cache: {n} tokens at position {pos0} do not fit "
                             f"(n_ctx {self.n_ctx}, n_ubatch {self.n_ubatch})")
        return pos0

    def store(self, il: int, pos0: int, k, v, stream=0):
        """Keys ``k [T, n_head_kv, head_dim]`` and values ``v [T, n_head_kv, head_dim_v]`` (device
        float32) of positions ``pos0 .. pos0 + T - 1`` for layer ``il``, into ring slots ``p % size``."""
        il = self._layer(il)
        cfg = self.cfg
        check_device("k", k, np.float32, ndims=(3,))
        T = k.shape[0]
        check_device("k", k, np.float32, (T, cfg.n_head_kv, cfg.head_dim))
        check_device("v", v, np.float32, (T, cfg.n_head_kv, cfg.head_dim_v))
        pos0 = self._span(pos0, T)
        if pos0 > self._stored[il]:
            raise ValueError(f"KV cache: storing position {pos0} of layer {il} would leave positions "
                             f"{self._stored[il]}..{pos0 - 1} unstored")
        n = T * cfg.n_head_kv * (cfg.head_dim + cfg.head_dim_v)
        _store_kernel[qc.grid_blocks(n, _STORE_THREADS), _STORE_THREADS, stream](k, v, pos0, self.k[il], self.v[il])
        self._oldest[il] = max(self._oldest[il], pos0 + T - self.size[il])
        self._stored[il] = pos0 + T


# ------------------------------------------------------------------ attention

@dataclass(frozen=True)
class LaunchPlan:
    """How ``attention`` launches: the tiles, row tiles per KV head and key splits (grid x, z)."""

    tiles: AttentionTiles
    row_tiles: int
    n_splits: int


def launch_plan(cfg, T: int, n_keys: int, config: AttentionConfig | None = None) -> LaunchPlan:
    """The launch of ``T`` query tokens over at most ``n_keys`` keys: narrow tiles up to
    ``narrow_rows`` rows; keys split while the blocks fall short of ``target_blocks``, each
    split at least ``split_keys`` keys, the ``n_splits * T * n_head`` partial rows inside
    the cache's scratch (``MAX_SPLITS * n_head``)."""
    config = AttentionConfig() if config is None else config
    rows = T * (cfg.n_head // cfg.n_head_kv)
    tiles = (config.narrow if rows <= config.narrow_rows else config.wide).fit(cfg.head_dim, cfg.head_dim_v)
    row_tiles = -(-rows // tiles.rows)
    want = -(-config.target_blocks // (row_tiles * cfg.n_head_kv))
    return LaunchPlan(tiles, row_tiles, max(1, min(want, n_keys // config.split_keys, MAX_SPLITS // T)))


def attention(cache: DeviceKVCache, il: int, q, pos0: int, scale: float, n_swa: int = 0, sinks=None, out=None,
              stream=0, *, config: AttentionConfig | None = None):
    """Device float32 [T, n_head * head_dim_v]: queries q (device float32 [T, n_head, head_dim],
    positions pos0..pos0+T-1) against layer il's cached keys (this ubatch's already stored),
    causal, GQA, sinks (device float32 [n_head] or None), sliding window n_swa (0: none),
    exactly the masking of ops.attention.

    ``out``: a device float32 [T, n_head * head_dim_v] to write (else one is allocated).
    ``config``: tiles and split policy (default ``AttentionConfig()``).
    """
    if not isinstance(cache, DeviceKVCache):
        raise TypeError(f"cache must be a DeviceKVCache, got {type(cache).__name__}")
    config = AttentionConfig() if config is None else config
    if not isinstance(config, AttentionConfig):
        raise TypeError(f"config must be an AttentionConfig, got {type(config).__name__}")
    cfg = cache.cfg
    il = cache._layer(il)
    H, Hkv, d, dv = cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.head_dim_v
    check_device("q", q, np.float32, ndims=(3,))
    T = q.shape[0]
    check_device("q", q, np.float32, (T, H, d))
    pos0 = cache._span(pos0, T)
    n_swa = _int("n_swa", n_swa)
    if n_swa < 0:
        raise ValueError(f"n_swa must be >= 0, got {n_swa}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)) \
            or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite number, got {scale!r}")
    if pos0 + T > cache._stored[il]:
        raise ValueError(f"attention: layer {il} holds positions up to {cache._stored[il] - 1}, "
                         f"queries at {pos0}..{pos0 + T - 1} need their own keys stored first")
    k_lo = max(0, pos0 - n_swa + 1) if n_swa else 0  # the first key any query sees
    if k_lo < cache._oldest[il]:
        raise ValueError(f"attention: layer {il} holds positions {cache._oldest[il]}..{cache._stored[il] - 1} "
                         f"(a ring of {cache.size[il]} slots); queries at {pos0}..{pos0 + T - 1} with n_swa "
                         f"{n_swa} need keys from {k_lo}")
    n_keys = pos0 + T - k_lo  # the widest key range of any row tile
    if sinks is not None:
        check_device("sinks", sinks, np.float32, (H,))
    if out is None:
        out = cuda.device_array((T, H * dv), np.float32, stream=stream)
    else:
        check_device("out", out, np.float32, (T, H * dv))

    plan = launch_plan(cfg, T, n_keys, config)
    tiles, n_splits = plan.tiles, plan.n_splits
    has_sinks = 0 if sinks is None else 1
    sinks_arg = cache.no_sinks if sinks is None else sinks
    kernel = _attention_kernel(tiles, d, dv)
    kernel[(plan.row_tiles, Hkv, n_splits), tiles.threads, stream, tiles.shared_bytes(d, dv)](
        q, cache.k[il], cache.v[il], pos0, n_swa, np.float32(scale), sinks_arg, has_sinks, out,
        cache.part_acc, cache.part_m, cache.part_l)
    if n_splits > 1:
        _combine_kernel[T * H, _COMBINE_THREADS, stream](cache.part_acc, cache.part_m, cache.part_l, n_splits,
                                                         sinks_arg, has_sinks, out)
    return out


# ------------------------------------------------------------------ variants (for compile checks)

# Resident blocks per SM the launches count on (the ptxas check holds the kernels to it):
# two 128-thread wide blocks, so one's loads hide behind the other's FMAs; four one-warp
# narrow blocks, the ``target_blocks`` of a split decode step spread over 132 SMs.
WIDE_MIN_BLOCKS_PER_SM = 2
NARROW_MIN_BLOCKS_PER_SM = 4


def variants(full: bool = True) -> list:
    """Every kernel build ``attention`` and ``DeviceKVCache.store`` launch under the default
    ``AttentionConfig``, with the argument types they pass: head dims 64 (gpt-oss) and, with
    ``full``, 128 (qwen3moe)."""
    A = lambda dt, nd: types.Array(dt, nd, "C")  # noqa: E731
    f32, i64 = types.float32, types.int64
    sig = (A(f32, 3), A(f32, 3), A(f32, 3), i64, i64, f32, A(f32, 1), i64, A(f32, 2), A(f32, 2), A(f32, 1),
           A(f32, 1))
    config, out = AttentionConfig(), []
    for d in (64, 128) if full else (64,):
        for name, tiles, blocks in (("wide", config.wide, WIDE_MIN_BLOCKS_PER_SM),
                                    ("narrow", config.narrow, NARROW_MIN_BLOCKS_PER_SM)):
            t = tiles.fit(d, d)
            out.append(Variant(f"attention {name} d{d}", _attention_kernel(t, d, d), sig, t.threads,
                               t.shared_bytes(d, d), blocks))
    out.append(Variant("attention combine", _combine_kernel,
                       (A(f32, 2), A(f32, 1), A(f32, 1), i64, A(f32, 1), i64, A(f32, 2)), _COMBINE_THREADS, 0, 1))
    out.append(Variant("kv store", _store_kernel, (A(f32, 3), A(f32, 3), i64, A(f32, 3), A(f32, 3)),
                       _STORE_THREADS, 0, 1))
    return out
