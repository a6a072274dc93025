"""The whole model's forward pass: tokens -> logits, llama.cpp's graph with ``HybridMoE`` as the MoE sublayer.

Each layer is its architecture's block (``arch/``: ``Arch.block``, written once), run by one
of two ``Ops`` (``arch.base.Ops``): ``ops_host.HostOps`` (the ``cpu`` target: numpy and
Numba on the host) or ``ops_device.DeviceOps`` (``cuda``/``sim``, when the MoE backend has a
device engine: PR #15346's setup, every weight but the experts on the device in the file's
type, the KV cache there, the hidden states on the device from the embedding lookup to the
logits). A layer's FFN is its kind: dense, routed experts, or routed plus shared experts.
Then ``logits = output (rmsnorm(h) * output_norm)``.

A prompt is split as llama.cpp splits it: batches of ``n_batch`` tokens, each
into ubatches of ``n_ubatch``; every ubatch runs all blocks before the next one
starts, so the MoE backend sees one ubatch per layer in order and its usage
lines are the model's own routing of the prompt. The splitting, token checks and
progress bar are shared by both targets; ``_ubatch`` and ``_ubatch_device`` only set
up the ubatch (positions, RoPE tables, buffers) and read the logits.
"""
from __future__ import annotations

import contextlib
import functools
import sys
import threading

import numba
import numpy as np
from numba import cuda

from ..kernels.cpu.dense import Dense
from ..kernels.cpu.experts import F32_TILES
from ..kernels.cuda import ops as device_ops
from ..kernels.cuda.attention import AttentionConfig, DeviceKVCache, attention as device_attention
from ..kernels.cuda.dense import DenseTiles, DeviceDense
from ..moe.scheduler import HybridMoE, resolve_device
from . import arch as archs, vram
from .arch.base import Block
from .config import Config, read_config
from .kvcache import KVCache
from .ops import rope_cos_sin
from .ops_device import DeviceOps
from .ops_host import HostOps
from .weights import Weights

__all__ = ["Transformer", "Block", "load_blocks"]

_SMALL_STEP_BYTES = 1 << 20  # expert bytes a ubatch reads below which the layers run on one thread


def load_blocks(model, cfg: Config) -> list[Block]:
    """Views of every block's dense weights (nothing decoded but norms, biases and sinks)."""
    arch, w = archs.get(model.arch, model.path, graph=True), Weights(model)
    return [arch.load_block(w, cfg, il, cfg.kinds[il]) for il in range(cfg.n_layer)]


def _locked(f):  # one KV cache: calls from two threads must not interleave inside a step
    @functools.wraps(f)
    def call(self, *a, **k):
        with self.lock:
            return f(self, *a, **k)
    return call


class Transformer:
    """A loaded model ready to run: ``prefill``, ``decode_one_token``, ``eval``.

    ``moe``: a ``HybridMoE`` over ``model.layers`` (default: one on ``device`` with
    ``policy``). A backend on ``cuda``/``sim`` puts the rest of the model on the device
    too (the module doc); ``vram_bytes`` bounds the device memory it may take in all
    (default: what the device has free, plus what ``moe`` already holds; the simulator
    has no bound); ``dense_tiles`` (a ``device_dense.DenseTiles``) and ``attention_config``
    (a ``device_attention.AttentionConfig``) size its kernels (default: for a GPU; the
    simulator's tests take small ones). ``n_ctx`` sizes the KV cache (default: the
    training context).

    Precision: an expert with few tokens in a ubatch (every decode step's; a prompt ubatch's
    lightly used ones, up to the format's crossover ``cpu.Q8_MAX_TOKENS``) multiplies int8
    activation blocks, as ggml does for every product, when its format has an integer dot (MXFP4,
    Q4_0, Q4_1, Q5_0, Q5_1, Q2_K to Q6_K, with VNNI Q8_0, IQ4_NL and IQ4_XS): about 1e-2 of the
    largest output per MoE layer, and a prompt's logits then depend on its split into ubatches by that
    much. ``f32``: float32 activations in every product, so logits agree across splits to float32
    rounding (README, "Precision").
    Threads: one Transformer is one sequence; its public methods take ``lock`` (an RLock)
    and ``generate`` holds it throughout, so concurrent generations run one after the other;
    use one Transformer per thread to run them at once.
    """

    def __init__(self, model, moe: HybridMoE | None = None, *, n_ctx: int | None = None,
                 n_batch: int = 2048, n_ubatch: int = 512, policy: str = "used", device: str = "cpu",
                 f32: bool = False, vram_bytes: int | None = None, dense_tiles=None, attention_config=None):
        self.lock = threading.RLock()
        self.model = model
        self.cfg = cfg = read_config(model)
        self.arch = archs.get(model.arch, model.path, graph=True)
        for name, v in (("n_batch", n_batch), ("n_ubatch", n_ubatch)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        n_ctx = cfg.n_ctx_train if n_ctx is None else n_ctx
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, (int, np.integer)) or n_ctx < 1:
            raise ValueError(f"n_ctx must be a positive int, got {n_ctx!r}")
        self.n_batch, self.n_ubatch, self.n_ctx = int(n_batch), int(min(n_ubatch, n_batch)), int(n_ctx)
        self.blocks = load_blocks(model, cfg)
        w = Weights(model)
        self.embd = w.mat("token_embd.weight", (cfg.n_vocab, cfg.n_embd))
        self.output_norm = w.vec("output_norm.weight", cfg.n_embd)
        # No output.weight: the head is tied to the embedding (llama.cpp does the same).
        self.output = (w.mat("output.weight", (cfg.n_vocab, cfg.n_embd))
                       if "output.weight" in model.tensors else self.embd)
        if moe is not None and (len(moe.layers) != len(model.layers)
                                or any(a is not b for a, b in zip(moe.layers, model.layers))):
            raise ValueError("moe must run this model's own MoE layers (HybridMoE(model.layers, ...))")
        # An architecture without device kernels (MLA) keeps its attention and dense weights on the
        # host; its routed experts still take the backend's offload path (HybridMoE on numpy input).
        self.on_device = self.arch.device_graph and (
            (moe.engine is not None) if moe is not None else resolve_device(device) != "cpu")
        if not self.on_device:
            self.cache = KVCache(cfg, self.n_ctx, self.n_ubatch)  # refuses a cache beyond the machine's memory
            self.moe = moe if moe is not None else HybridMoE(model.layers, device=device, policy=policy)
            self.ops = HostOps(cfg, self.cache, self.moe)
        else:  # everything counted against the device's memory before anything is allocated
            self.dense_tiles = DenseTiles() if dense_tiles is None else dense_tiles
            self.attention_config = AttentionConfig() if attention_config is None else attention_config
            if not isinstance(self.dense_tiles, DenseTiles):
                raise TypeError(f"dense_tiles must be a DenseTiles or None, got {type(dense_tiles).__name__}")
            if not isinstance(self.attention_config, AttentionConfig):
                raise TypeError(f"attention_config must be an AttentionConfig or None, "
                                f"got {type(attention_config).__name__}")
            vram.check(self, moe, vram_bytes, resolve_device(device))
            self.moe = moe if moe is not None else HybridMoE(model.layers, device=device, policy=policy)
            self._to_device()
            self.ops = DeviceOps(cfg, self.cache, self.moe, self.attention_config)
        self.ops.moe_index = {L.index: j for j, L in enumerate(model.layers)}
        self._tiles = F32_TILES if f32 else None  # the CPU expert path's blocking (None: its default)
        first = model.layers[0]
        self._expert_step_bytes = first.k * first.expert_bytes  # what one token's MoE step reads

    @property
    def n_past(self) -> int:
        return self.cache.n_past

    @_locked
    def reset(self):
        """Empty the KV cache and the MoE statistics: a new prompt starts."""
        self.cache.clear()
        self.moe.reset()

    # -- public entry points -------------------------------------------------------

    @_locked
    def prefill(self, tokens, logits: str = "all", progress: bool = False) -> np.ndarray:
        """Reset, then run the prompt; float32 logits ``[n_tokens, n_vocab]`` (``logits="last"``: ``[1, n_vocab]``)."""
        self.reset()
        return self.eval(tokens, logits=logits, progress=progress)

    @_locked
    def decode_one_token(self, token: int) -> np.ndarray:
        """Append one token after the cache's contents; its logits float32 ``[n_vocab]``."""
        return self.eval([token], logits="last")[0]

    @_locked
    def eval(self, tokens, logits: str = "all", progress: bool = False) -> np.ndarray:
        """Run ``tokens`` after what the cache holds, ubatch by ubatch (see the module doc)."""
        ids = self.check_tokens(tokens)
        if logits not in ("all", "last"):
            raise ValueError(f"logits must be 'all' or 'last', got {logits!r}")
        bar = None
        if progress:  # tqdm itself hides on a non-terminal
            from tqdm import tqdm
            bar = tqdm(total=len(ids), unit="tok", file=sys.stderr, leave=False, desc="prompt", disable=None)
        out = []
        try:
            for s, e in self.ubatch_bounds(len(ids)):
                want = "all" if logits == "all" else ("last" if e == len(ids) else None)
                run = self._ubatch_device if self.on_device else self._ubatch
                y = run(ids[s:e], want, self._tiles)
                if y is not None:
                    out.append(y)
                if bar is not None:
                    bar.update(e - s)
        finally:
            if bar is not None:
                bar.close()
        return np.concatenate(out) if len(out) > 1 else out[0]

    def ubatch_bounds(self, n: int) -> list[tuple[int, int]]:
        """``(start, end)`` of each ubatch ``n`` tokens run in: batches of ``n_batch``, each split
        into ubatches of ``n_ubatch`` (a batch's last ubatch may be short), as llama.cpp splits."""
        return [(b0 + u0, b0 + min(u0 + self.n_ubatch, min(self.n_batch, n - b0)))
                for b0 in range(0, n, self.n_batch) for u0 in range(0, min(self.n_batch, n - b0), self.n_ubatch)]

    def check_tokens(self, tokens) -> np.ndarray:
        """Token ids as int64, or a ValueError/TypeError saying what is wrong with them."""
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"tokens must be a 1-D sequence of ids, got shape {arr.shape}")
        if arr.size == 0:
            raise ValueError("the prompt is empty: no tokens to run")
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"token ids must be integers, got {arr.dtype}")
        bad = arr[(arr < 0) | (arr >= self.cfg.n_vocab)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is outside the vocabulary [0, {self.cfg.n_vocab})")
        if self.n_past + arr.size > self.n_ctx:
            raise ValueError(f"{arr.size} tokens after {self.n_past} in the cache exceed the context of "
                             f"{self.n_ctx} tokens (raise -c / n_ctx)")
        return arr.astype(np.int64)

    # -- one ubatch through every block ----------------------------------------------

    @contextlib.contextmanager
    def _cpu_threads(self, T: int):
        # A step too small to share: the CPU expert kernels' parallel regions would cost
        # more in wake-ups and barriers than the work (tiny models' decode steps).
        threads = numba.get_num_threads()
        if T * self._expert_step_bytes < _SMALL_STEP_BYTES and threads > 1:
            numba.set_num_threads(1)
        try:
            yield
        finally:
            numba.set_num_threads(threads)

    def _ubatch(self, ids: np.ndarray, want, cpu_tiles) -> np.ndarray | None:
        cfg, cache, ops = self.cfg, self.cache, self.ops
        T, pos0 = len(ids), cache.n_past
        ops.begin(np.arange(pos0, pos0 + T), cpu_tiles)
        h = ops.embed(self.embd, ids)
        with self._cpu_threads(T):
            for il, b in enumerate(self.blocks):
                self.arch.block(ops, cfg, il, b, h)
        self.moe.end_ubatch()
        cache.n_past = pos0 + T
        if want is None:
            return None
        return ops.logits(self.output, self.output_norm, h[-1:] if want == "last" else h)

    # -- the same on the device (the module doc) ----------------------------------------

    def _to_device(self):
        """Device copies of the dense weights (DeviceDense, in the file's type), of the norms,
        biases and sinks (float32), and the KV cache on the device."""
        s = self.moe.stream

        def up(v):
            if isinstance(v, Dense):
                return DeviceDense(v, stream=s, tiles=self.dense_tiles)
            return cuda.to_device(np.ascontiguousarray(v, np.float32), stream=s)

        self.dev_blocks = [b.map(up) for b in self.blocks]
        self.dev_embd = up(self.embd)
        self.dev_output = self.dev_embd if self.output is self.embd else up(self.output)
        self.dev_output_norm = up(self.output_norm)
        self.cache = DeviceKVCache(self.cfg, self.n_ctx, self.n_ubatch)
        self._scratch = {}

    def _buffers(self, T: int) -> dict:
        """Device activations of a ubatch of ``T`` tokens (kept for the last T): no allocation per
        layer, which could synchronise the device."""
        if T not in self._scratch:
            self.moe.synchronize()  # enqueued work may still use the buffers dropped here
            self._scratch = {T: {name: cuda.device_array(shape, np.int32 if name == "ids" else np.float32)
                                 for name, shape in vram.device_activations(self.cfg, T).items()}}
        return self._scratch[T]

    def _ubatch_device(self, ids: np.ndarray, want, cpu_tiles) -> np.ndarray | None:
        cfg, cache, s = self.cfg, self.cache, self.moe.stream
        T, pos0 = len(ids), cache.n_past
        pos = np.arange(pos0, pos0 + T)
        buf = self._buffers(T)
        rope = {}  # (cos, sin) by RoPE base: one upload per ubatch, not per layer
        for i, (base, il) in enumerate({cfg.rope_base(il): il for il in range(cfg.n_layer)}.items()):
            rope[base] = buf["rope"][i, 0], buf["rope"][i, 1]
            for dev, host in zip(rope[base], rope_cos_sin(cfg, il, pos)):
                dev.copy_to_device(host, stream=s)
        buf["ids"].copy_to_device(ids.astype(np.int32), stream=s)
        h = self.dev_embd.rows(buf["ids"], out=buf["h"], stream=s)
        self.ops.begin(buf, pos0, rope, cpu_tiles)
        with self._cpu_threads(T):  # decode steps run the experts on the CPU
            for il, b in enumerate(self.dev_blocks):
                self.arch.block(self.ops, cfg, il, b, h)
        self.moe.end_ubatch()
        cache.n_past = pos0 + T
        if want is None:
            self.moe.synchronize()
            return None
        if want == "last":
            h = h[T - 1:]
        n = h.shape[0]
        x = device_ops.rmsnorm(h, self.dev_output_norm, cfg.rms_eps, out=buf["x"][:n], stream=s)
        logits = self.dev_output.matmul(x, out=buf["logits"][:n], stream=s).copy_to_host(stream=s)
        self.moe.synchronize()  # (the logits are on the host; this completes the step times)
        return logits
