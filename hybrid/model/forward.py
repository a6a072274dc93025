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
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numba
import numpy as np

from ..moe.cpu import CpuTiles
from ..moe.scheduler import HybridMoE
from .config import Config, read_config
from .dense import Dense
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

    ``moe``: a ``HybridMoE`` over ``model.layers`` (default: one on the CPU target
    with ``policy``). ``n_ctx`` sizes the KV cache (default: the training context).

    Precision: prompt ubatches compute the experts with float32 activations, so a
    prompt's logits do not depend on how it is split. Decode steps (``decode_one_token``)
    multiply MXFP4 experts with int8 activations, as ggml does (``q8_decode``; about
    1e-2 of the largest output per MoE layer, see ``cpu.CpuTiles.q8_tokens``), since
    decode reads every used expert byte once per token and runs at memory speed that way.
    """

    def __init__(self, model, moe: HybridMoE | None = None, *, n_ctx: int | None = None,
                 n_batch: int = 2048, n_ubatch: int = 512, policy: str = "used", device: str = "cpu",
                 q8_decode: bool = True):
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
        self.cache = KVCache(cfg, self.n_ctx, self.n_ubatch)  # refuses a cache beyond the machine's memory
        self.moe = moe if moe is not None else HybridMoE(model.layers, device=device, policy=policy)
        if len(self.moe.layers) != cfg.n_layer or any(a is not b for a, b in zip(self.moe.layers, model.layers)):
            raise ValueError("moe must run this model's own MoE layers (HybridMoE(model.layers, ...))")
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
                y = self._ubatch(ids[s:e], want, self._tiles[bool(decode)])
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

    def _ubatch(self, ids: np.ndarray, want, cpu_tiles) -> np.ndarray | None:
        cfg, cache = self.cfg, self.cache
        T, pos0 = len(ids), cache.n_past
        pos = np.arange(pos0, pos0 + T)
        h = self.embd.rows(ids)
        # A step too small to share: the CPU expert kernels' parallel regions would cost
        # more in wake-ups and barriers than the work (tiny models' decode steps).
        threads = numba.get_num_threads()
        if T * self._expert_step_bytes < _SMALL_STEP_BYTES and threads > 1:
            numba.set_num_threads(1)
        try:
            for il, b in enumerate(self.blocks):
                x = rmsnorm(h, b.attn_norm, cfg.rms_eps)
                h = h + self._attention(il, b, x, pos)
                x = rmsnorm(h, b.ffn_norm, cfg.rms_eps)
                h = h + self.moe.forward(il, x, cpu_tiles=cpu_tiles)
        finally:
            numba.set_num_threads(threads)
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
