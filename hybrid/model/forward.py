"""The whole model's forward pass: tokens -> logits, llama.cpp's graph with ``HybridMoE`` as the MoE sublayer.

Per block (gpt-oss; qwen3moe differs as ``Config`` says):
    x = rmsnorm(h) * attn_norm
    q, k, v = Wq x + bq, Wk x + bk, Wv x + bv        (qwen3moe: rmsnorm per head of q, k)
    q, k = rope(q), rope(k)                          (NEOX, YaRN)
    h += Wo attention(q, K, V) + bo                  (GQA, sinks, sliding window on some layers)
    h += moe(rmsnorm(h) * post_attention_norm)
then logits = output (rmsnorm(h) * output_norm).

A prompt is split as llama.cpp splits it: batches of ``n_batch`` tokens, each
into ubatches of ``n_ubatch``; every ubatch runs all blocks before the next one
starts, so the MoE backend sees one ubatch per layer in order and its usage
lines are the model's own routing of the prompt.

Two targets run the ubatch. ``cpu``: numpy and Numba on the host (``_ubatch``).
``cuda``/``sim`` (the MoE backend has a device engine): PR #15346's setup, every
weight but the experts on the device in the file's type, the KV cache there,
and the hidden states on the device from the embedding lookup to the logits
(``_ubatch_device``, written to mirror ``_ubatch`` line by line so the two
read side by side; a shared ops layer would hide the device's in-place adds,
output buffers and stream behind indirection that the CPU path does not
need). All device work runs in order on the MoE backend's stream; the one
synchronisation per layer is the router logits going to the host, inside
``HybridMoE.forward``. The splitting, token checks and progress bar are shared.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from dataclasses import dataclass

import numba
import numpy as np
from numba import cuda

from ..kernels.cpu.dense import Dense
from ..kernels.cpu.experts import CpuTiles
from ..kernels.cuda import ops as device_ops
from ..kernels.cuda.attention import AttentionConfig, DeviceKVCache, attention as device_attention
from ..kernels.cuda.dense import DenseTiles, DeviceDense
from ..moe.scheduler import HybridMoE, resolve_device
from . import vram
from .config import Config, read_config
from .gguf import GGUFError
from .kvcache import KVCache
from .ops import attention, rmsnorm, rope_cos_sin, rope_neox

__all__ = ["Transformer", "Block"]

_PROMPT_TILES = CpuTiles(q8_tokens=0)  # prompt ubatches: float32 activations at any size
_SMALL_STEP_BYTES = 1 << 20  # expert bytes a ubatch reads below which the layers run on one thread


@dataclass
class Block:
    attn_norm: np.ndarray
    wq: Dense
    wk: Dense
    wv: Dense
    wo: Dense
    ffn_norm: np.ndarray
    bq: np.ndarray | None = None
    bk: np.ndarray | None = None
    bv: np.ndarray | None = None
    bo: np.ndarray | None = None
    sinks: np.ndarray | None = None
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None


def _dense(model, name, shape) -> Dense:
    info = model.tensors.get(name)
    if info is None:
        raise GGUFError(f"{model.path}: missing tensor {name} (arch {model.arch})")
    if info.shape != tuple(shape):
        raise GGUFError(f"{model.path}: {name} has shape {info.shape}, expected {tuple(shape)}")
    try:
        return Dense(name, model.raw(name), info.ggml_type, shape)
    except TypeError as e:
        raise GGUFError(f"{model.path}: {e}") from None


def _vector(model, name, n, required=True):
    info = model.tensors.get(name)
    if info is None:
        if required:
            raise GGUFError(f"{model.path}: missing tensor {name} (arch {model.arch})")
        return None
    if info.shape != (n,):
        raise GGUFError(f"{model.path}: {name} has shape {info.shape}, expected ({n},)")
    try:
        return model.tensor(name)
    except NotImplementedError as e:
        raise GGUFError(f"{model.path}: {name}: {e}") from None


def load_blocks(model, cfg: Config) -> list[Block]:
    """Views of every block's dense weights (nothing decoded but norms, biases and sinks)."""
    D, H, Hkv, d, dv = cfg.n_embd, cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.head_dim_v
    blocks = []
    for il in range(cfg.n_layer):
        p = f"blk.{il}."
        b = Block(attn_norm=_vector(model, p + "attn_norm.weight", D),
                  wq=_dense(model, p + "attn_q.weight", (H * d, D)),
                  wk=_dense(model, p + "attn_k.weight", (Hkv * d, D)),
                  wv=_dense(model, p + "attn_v.weight", (Hkv * dv, D)),
                  wo=_dense(model, p + "attn_output.weight", (D, H * dv)),
                  ffn_norm=_vector(model, p + cfg.ffn_norm + ".weight", D))
        if cfg.qkv_bias:
            b.bq, b.bk = _vector(model, p + "attn_q.bias", H * d), _vector(model, p + "attn_k.bias", Hkv * d)
            b.bv, b.bo = _vector(model, p + "attn_v.bias", Hkv * dv), _vector(model, p + "attn_output.bias", D)
        if cfg.sinks:
            b.sinks = _vector(model, p + "attn_sinks.weight", H)
        if cfg.qk_norm:
            b.q_norm = _vector(model, p + "attn_q_norm.weight", d)
            b.k_norm = _vector(model, p + "attn_k_norm.weight", d)
        blocks.append(b)
    return blocks


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

    Precision: prompt ubatches compute the experts with float32 activations, so a
    prompt's logits do not depend on how it is split. Decode steps (``decode_one_token``)
    multiply MXFP4 experts with int8 activations, as ggml does (``q8_decode``; about
    1e-2 of the largest output per MoE layer, see ``cpu.CpuTiles.q8_tokens``), since
    decode reads every used expert byte once per token and runs at memory speed that way.
    """

    def __init__(self, model, moe: HybridMoE | None = None, *, n_ctx: int | None = None,
                 n_batch: int = 2048, n_ubatch: int = 512, policy: str = "used", device: str = "cpu",
                 q8_decode: bool = True, vram_bytes: int | None = None, dense_tiles=None, attention_config=None):
        self.model = model
        self.cfg = cfg = read_config(model)
        if model.dense_blocks:
            raise GGUFError(f"{model.path}: blocks {model.dense_blocks} have a dense FFN; "
                            "only all-MoE models are supported")
        for name, v in (("n_batch", n_batch), ("n_ubatch", n_ubatch)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        n_ctx = cfg.n_ctx_train if n_ctx is None else n_ctx
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, (int, np.integer)) or n_ctx < 1:
            raise ValueError(f"n_ctx must be a positive int, got {n_ctx!r}")
        self.n_batch, self.n_ubatch, self.n_ctx = int(n_batch), int(min(n_ubatch, n_batch)), int(n_ctx)
        self.blocks = load_blocks(model, cfg)
        self.embd = _dense(model, "token_embd.weight", (cfg.n_vocab, cfg.n_embd))
        self.output_norm = _vector(model, "output_norm.weight", cfg.n_embd)
        # No output.weight: the head is tied to the embedding (llama.cpp does the same).
        self.output = (_dense(model, "output.weight", (cfg.n_vocab, cfg.n_embd))
                       if "output.weight" in model.tensors else self.embd)
        if moe is not None and (len(moe.layers) != cfg.n_layer
                                or any(a is not b for a, b in zip(moe.layers, model.layers))):
            raise ValueError("moe must run this model's own MoE layers (HybridMoE(model.layers, ...))")
        self.on_device = (moe.engine is not None) if moe is not None else resolve_device(device) != "cpu"
        if not self.on_device:
            self.cache = KVCache(cfg, self.n_ctx, self.n_ubatch)  # refuses a cache beyond the machine's memory
            self.moe = moe if moe is not None else HybridMoE(model.layers, device=device, policy=policy)
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
        self._tiles = {False: _PROMPT_TILES, True: None if q8_decode else _PROMPT_TILES}  # by "is a decode step"
        first = model.layers[0]
        self._expert_step_bytes = first.k * first.expert_bytes  # what one token's MoE step reads

    @property
    def n_past(self) -> int:
        return self.cache.n_past

    def reset(self):
        """Empty the KV cache and the MoE statistics: a new prompt starts."""
        self.cache.clear()
        self.moe.reset()

    # -- public entry points -------------------------------------------------------

    def prefill(self, tokens, logits: str = "all", progress: bool = False) -> np.ndarray:
        """Reset, then run the prompt; float32 logits ``[n_tokens, n_vocab]`` (``logits="last"``: ``[1, n_vocab]``)."""
        self.reset()
        return self.eval(tokens, logits=logits, progress=progress)

    def decode_one_token(self, token: int) -> np.ndarray:
        """Append one token after the cache's contents; its logits float32 ``[n_vocab]``."""
        return self.eval([token], logits="last", decode=True)[0]

    def eval(self, tokens, logits: str = "all", progress: bool = False, decode: bool = False) -> np.ndarray:
        """Run ``tokens`` after what the cache holds, ubatch by ubatch (see the module doc);
        ``decode``: a generation step (the class doc says what changes)."""
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
                y = run(ids[s:e], want, self._tiles[bool(decode)])
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
        cfg, cache = self.cfg, self.cache
        T, pos0 = len(ids), cache.n_past
        pos = np.arange(pos0, pos0 + T)
        h = self.embd.rows(ids)
        with self._cpu_threads(T):
            for il, b in enumerate(self.blocks):
                x = rmsnorm(h, b.attn_norm, cfg.rms_eps)
                h = h + self._attention(il, b, x, pos)
                x = rmsnorm(h, b.ffn_norm, cfg.rms_eps)
                h = h + self.moe.forward(il, x, cpu_tiles=cpu_tiles)
        self.moe.end_ubatch()
        cache.n_past = pos0 + T
        if want is None:
            return None
        if want == "last":
            h = h[-1:]
        return self.output.matmul(rmsnorm(h, self.output_norm, cfg.rms_eps))

    def _attention(self, il: int, b: Block, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        cfg = self.cfg
        T = x.shape[0]
        q, k, v = b.wq.matmul(x), b.wk.matmul(x), b.wv.matmul(x)
        if cfg.qkv_bias:
            q += b.bq
            k += b.bk
            v += b.bv
        q = q.reshape(T, cfg.n_head, cfg.head_dim)
        k = k.reshape(T, cfg.n_head_kv, cfg.head_dim)
        v = v.reshape(T, cfg.n_head_kv, cfg.head_dim_v)
        if cfg.qk_norm:
            q = rmsnorm(q, b.q_norm, cfg.rms_eps)
            k = rmsnorm(k, b.k_norm, cfg.rms_eps)
        cos, sin = rope_cos_sin(cfg, il, pos)
        q, k = rope_neox(q, cos, sin), rope_neox(k, cos, sin)
        self.cache.store(il, int(pos[0]), k, v)
        K, V, kpos = self.cache.window(il, int(pos[0]), T)
        n_swa = cfg.n_swa if cfg.swa_layers[il] else 0
        a = attention(q, K, V, pos, kpos, cfg.kq_scale, n_swa, b.sinks)
        o = b.wo.matmul(a)
        if b.bo is not None:
            o += b.bo
        return o

    # -- the same on the device (the module doc) ----------------------------------------

    def _to_device(self):
        """Device copies of the dense weights (DeviceDense, in the file's type), of the norms,
        biases and sinks (float32), and the KV cache on the device."""
        s = self.moe.stream

        def up(v):
            if isinstance(v, Dense):
                return DeviceDense(v, stream=s, tiles=self.dense_tiles)
            return None if v is None else cuda.to_device(np.ascontiguousarray(v, np.float32), stream=s)

        self.dev_blocks = [dataclasses.replace(b, **{f.name: up(getattr(b, f.name)) for f in dataclasses.fields(b)})
                           for b in self.blocks]
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
                                 for name, shape in device_activations(self.cfg, T).items()}}
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
        with self._cpu_threads(T):  # decode steps run the experts on the CPU
            for il, b in enumerate(self.dev_blocks):
                x = device_ops.rmsnorm(h, b.attn_norm, cfg.rms_eps, out=buf["x"], stream=s)
                device_ops.add(h, self._attention_device(il, b, x, pos0, rope[cfg.rope_base(il)], buf), stream=s)
                x = device_ops.rmsnorm(h, b.ffn_norm, cfg.rms_eps, out=buf["x"], stream=s)
                device_ops.add(h, self.moe.forward(il, x, cpu_tiles=cpu_tiles, out=buf["moe"]), stream=s)
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

    def _attention_device(self, il: int, b: Block, x, pos0: int, rope, buf):
        cfg, s = self.cfg, self.moe.stream
        T = x.shape[0]
        q = b.wq.matmul(x, out=buf["q"], stream=s)
        k = b.wk.matmul(x, out=buf["k"], stream=s)
        v = b.wv.matmul(x, out=buf["v"], stream=s)
        if cfg.qkv_bias:
            device_ops.add(q, b.bq, stream=s)
            device_ops.add(k, b.bk, stream=s)
            device_ops.add(v, b.bv, stream=s)
        q = q.reshape(T, cfg.n_head, cfg.head_dim)
        k = k.reshape(T, cfg.n_head_kv, cfg.head_dim)
        v = v.reshape(T, cfg.n_head_kv, cfg.head_dim_v)
        if cfg.qk_norm:
            q = device_ops.rmsnorm(q, b.q_norm, cfg.rms_eps, out=q, stream=s)  # (in place is allowed)
            k = device_ops.rmsnorm(k, b.k_norm, cfg.rms_eps, out=k, stream=s)
        device_ops.rope_neox(q, *rope, stream=s)
        device_ops.rope_neox(k, *rope, stream=s)
        self.cache.store(il, pos0, k, v, stream=s)
        n_swa = cfg.n_swa if cfg.swa_layers[il] else 0
        a = device_attention(self.cache, il, q, pos0, cfg.kq_scale, n_swa, b.sinks, out=buf["attn"], stream=s,
                             config=self.attention_config)
        o = b.wo.matmul(a, out=buf["o"], stream=s)
        if b.bo is not None:
            device_ops.add(o, b.bo, stream=s)
        return o


def device_activations(cfg: Config, T: int) -> dict:
    """Device buffers a ubatch of ``T`` tokens uses (name -> shape; 4-byte elements, int32 ``ids``,
    else float32): the token ids, RoPE's cos and sin per base, the residual, a normed copy,
    q/k/v, attention and projection outputs, the MoE output, the logits."""
    D, H, Hkv, d, dv = cfg.n_embd, cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.head_dim_v
    n_bases = len({cfg.rope_base(il) for il in range(cfg.n_layer)})
    return dict(ids=(T,), rope=(n_bases, 2, T, cfg.n_rot // 2), h=(T, D), x=(T, D), q=(T, H * d), k=(T, Hkv * d),
                v=(T, Hkv * dv), attn=(T, H * dv), o=(T, D), moe=(T, D), logits=(T, cfg.n_vocab))
