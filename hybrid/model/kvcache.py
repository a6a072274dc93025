"""The KV cache: per layer K and V of past positions, float32.

Full-attention layers hold ``n_ctx`` positions. Sliding-window layers keep only
their window, as llama.cpp's SWA cache does: a ring of ``n_swa + n_ubatch``
slots, position p in slot ``p % size``. A ubatch of at most ``n_ubatch`` tokens
writes its keys before attending, and the oldest key its first query needs is
``n_swa - 1`` back, so the ring never overwrites a key still in use.

A cache larger than the machine's memory is refused before anything is
allocated (the arrays are zero pages until written, so an oversized one would
fail only when the context fills).
"""
from __future__ import annotations

import os

import numpy as np

__all__ = ["KVCache", "kv_sizes", "kv_nbytes", "physical_memory", "rewind_fits"]


def physical_memory() -> int | None:
    """Bytes of RAM in this machine (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def kv_sizes(cfg, n_ctx: int, n_ubatch: int) -> list[int]:
    """Slots of each layer's cache: ``n_ctx``, or on sliding-window layers the ring of
    ``min(n_ctx, n_swa + n_ubatch)`` (the host and the device cache both use this)."""
    return [min(int(n_ctx), cfg.n_swa + int(n_ubatch)) if s else int(n_ctx) for s in cfg.swa_layers]


def kv_nbytes(cfg, n_ctx: int, n_ubatch: int) -> int:
    """Bytes of K and V (float32) over all layers; with MLA only K (the latent and the rope key:
    V is the latent, a view of K's first ``head_dim_v`` dims, as llama.cpp's MLA cache)."""
    width = cfg.head_dim + (0 if getattr(cfg, "mla", False) else cfg.head_dim_v)
    return sum(kv_sizes(cfg, n_ctx, n_ubatch)) * cfg.n_head_kv * width * 4


def rewind_fits(swa, oldest, n: int) -> bool:
    """Whether every layer still holds the keys a query at position ``n`` attends to: its
    window ``n - swa + 1 ..`` (``swa`` 0: from 0) starts at or after ``oldest``, the oldest
    position the layer's slots hold."""
    return all((max(0, n - w + 1) if w else 0) >= o for w, o in zip(swa, oldest))


class KVCache:
    def __init__(self, cfg, n_ctx: int, n_ubatch: int):
        self.n_ctx, self.n_ubatch = int(n_ctx), int(n_ubatch)
        self.swa = [cfg.n_swa if s else 0 for s in cfg.swa_layers]
        self.size = kv_sizes(cfg, n_ctx, n_ubatch)
        need = kv_nbytes(cfg, n_ctx, n_ubatch)
        ram = physical_memory()
        if ram is not None and need > ram:
            raise ValueError(f"a context of {self.n_ctx:,} tokens needs a KV cache of {need / 2**30:.1f} GiB "
                             f"({need:,} bytes), more than this machine's {ram / 2**30:.1f} GiB of memory "
                             "(lower -c / n_ctx)")
        self.k = [np.zeros((n, cfg.n_head_kv, cfg.head_dim), np.float32) for n in self.size]
        self.mla = getattr(cfg, "mla", False)
        if self.mla:  # V is the latent: K's leading dims (store writes the same values there)
            self.v = [k[:, :, :cfg.head_dim_v] for k in self.k]
        else:
            self.v = [np.zeros((n, cfg.n_head_kv, cfg.head_dim_v), np.float32) for n in self.size]
        self.n_past = 0  # positions 0..n_past-1 are stored

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k + ([] if self.mla else self.v))

    def clear(self):
        self.n_past = 0

    def rewind(self, n: int) -> bool:
        """Keep positions ``0 .. n-1`` and forget the rest, so the next tokens go at ``n``
        (a prompt that shares a prefix with the last one). False, nothing changed, where a
        sliding-window ring has overwritten a key that position ``n``'s query needs."""
        oldest = [max(0, self.n_past - s) for s in self.size]
        if not 0 <= n <= self.n_past or not rewind_fits(self.swa, oldest, n):
            return False
        self.n_past = n
        return True

    def store(self, il: int, pos0: int, k: np.ndarray, v: np.ndarray):
        """Keys and values of positions ``pos0 .. pos0 + len(k) - 1`` for layer ``il``."""
        n = k.shape[0]
        if n > self.n_ubatch or pos0 + n > self.n_ctx:
            raise ValueError(f"KV cache: {n} tokens at position {pos0} do not fit "
                             f"(n_ctx {self.n_ctx}, n_ubatch {self.n_ubatch})")
        slots = np.arange(pos0, pos0 + n) % self.size[il]
        self.k[il][slots] = k
        if not self.mla:
            self.v[il][slots] = v

    def window(self, il: int, pos0: int, n: int):
        """Keys, values and their positions that queries ``pos0 .. pos0 + n - 1`` can see."""
        end = pos0 + n
        lo = max(0, pos0 - self.swa[il] + 1) if self.swa[il] else 0
        if self.size[il] >= end:  # no wrap yet: a view, no gather
            return self.k[il][lo:end], self.v[il][lo:end], np.arange(lo, end)
        pos = np.arange(lo, end)
        slots = pos % self.size[il]
        return self.k[il][slots], self.v[il][slots], pos
