"""Host memory for async copies, device slot buffers, and the copies themselves.

Host modes (``HOST_MODES``):
- ``pinned``: page-lock the expert bytes where they are (register the memory
  map). DMA reads host RAM directly, so copies are truly asynchronous. In
  ``auto``, spans that cannot be registered go through the staging buffer
  (never a pinned copy of the file: that could be tens of GB).
- ``staged``: a small pinned double buffer; the CPU copies a chunk of the
  planned range from the memory map into one half while the DMA engine drains
  the other. Costs a CPU memcpy, needs no pinning of the model; the engine
  runs these copies on a host thread so kernels launch meanwhile.
- ``pageable``: plain copies from the memory map (the driver stages them
  synchronously; on a host thread too): the slow baseline.
``auto`` tries pinned, then staged, then pageable, and reports the choice; a
pin that fails part-way unregisters what it had registered first.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap

import numpy as np
from numba import cuda

log = logging.getLogger(__name__)

HOST_MODES = ("auto", "pinned", "staged", "pageable")
STAGE_BYTES = 32 << 20  # one half of the staging buffer


def flat_bytes(a: np.ndarray) -> np.ndarray:
    """A contiguous array as a flat view (uint8 stays uint8, float32 stays float32)."""
    if not a.flags.c_contiguous:
        raise ValueError("host expert arrays must be C-contiguous")
    return a.reshape(-1)


class HostMemory:
    """The host side of the expert tensors of every layer, ready for copies.

    ``arrays`` are flat views; after ``prepare`` ``self.arrays`` may be pinned
    copies instead (same bytes). ``self.mode`` is the mode actually in use.
    """

    def __init__(self, arrays: list[np.ndarray], mode: str = "auto", stage_bytes: int = STAGE_BYTES):
        if mode not in HOST_MODES:
            raise ValueError(f"host mode must be one of {HOST_MODES}, got {mode!r}")
        if stage_bytes <= 0:
            raise ValueError("stage_bytes must be positive")
        self._stack = contextlib.ExitStack()
        self.arrays = [flat_bytes(a) for a in arrays]
        self.stage_bytes = int(stage_bytes)
        self.mode = mode
        self.note = ""
        self._staged = set()  # arrays whose pages could not be registered: staged (or pageable) copies
        if mode in ("auto", "pinned"):
            try:
                failed, n_failed, n_spans = self._pin(self.arrays)
                self.note = f"pinned in place ({n_spans - n_failed} of {n_spans} span{'s' if n_spans > 1 else ''})"
                if failed:
                    gb = sum(self.arrays[i].nbytes for i in failed) / 1e9
                    why = f"{n_failed} of {n_spans} span{'s' if n_spans > 1 else ''} ({gb:.2f} GB) could not be registered"
                    self.note += f"; {why}: copied through the staged buffer"
            except Exception as exc:  # pinning tens of GB can fail for many reasons
                failed, why = set(range(len(self.arrays))), str(exc)
            if failed and mode == "pinned":
                self._stack.close()
                raise RuntimeError(f"could not pin the expert weights: {why}; host='staged' or 'auto' "
                                   f"copies them through a staging buffer")
            if len(failed) == len(self.arrays):
                self.mode, self.note = "staged", f"pinning failed ({why}); using a staged pinned buffer"
                log.info(self.note)
            else:
                self.mode, self._staged = "pinned", failed
        self._stage = None
        if self.mode == "staged" or self._staged:
            try:
                self._stage = [cuda.pinned_array(self.stage_bytes, np.uint8) for _ in range(2)]
            except Exception as exc:
                if mode == "staged":
                    raise RuntimeError(f"could not allocate the pinned staging buffer: {exc}") from exc
                if self.mode == "staged":
                    self.mode = "pageable"
                self.note = f"{self.note}; staging failed too ({exc}): pageable copies"
                log.warning(self.note)
            self._stage_ev = [None, None]
            self._half = 0

    @property
    def host_copies(self) -> bool:
        """Whether some copies cost host time (staged or pageable), so run them on a thread."""
        return self.mode in ("staged", "pageable") or bool(self._staged)

    def _pin(self, arrays):
        """Page-lock every span of memory the arrays live in, each span once; returns the
        indices of the arrays whose span could not be registered (they go through the
        staging buffer: a pinned copy of them could be tens of GB), how many spans failed and
        how many there are.

        Tensors of one GGUF file sit back to back and share pages at their edges;
        registering them one by one would fail on the second ('already
        registered'), so spans that touch a common page are merged first.
        """
        spans = _spans(arrays)
        failed, n_failed = set(), 0
        # Registrations go on a stack of their own: if anything below fails, the
        # spans already registered are unregistered before the fallback mode starts.
        with contextlib.ExitStack() as stack:
            for lo, hi, members in spans:
                try:
                    stack.enter_context(cuda.pinned(_raw_view(lo, hi)))
                except Exception:
                    try:
                        self._register_read_only(stack, lo, hi - lo)
                    except Exception:
                        failed.update(members)
                        n_failed += 1
            self._stack.enter_context(stack.pop_all())
        return failed, n_failed, len(spans)

    def _register_read_only(self, stack, ptr, size):
        # A GGUF memory map is read-only: the driver registers it only with
        # CU_MEMHOSTREGISTER_READ_ONLY, which numba's cuda.pinned does not pass.
        if _simulator():
            raise RuntimeError("no driver under the simulator")
        from numba.cuda.cudadrv.driver import binding, driver
        driver.cuMemHostRegister(ptr, size, binding.CU_MEMHOSTREGISTER_READ_ONLY)
        stack.callback(driver.cuMemHostUnregister, ptr)

    def close(self):
        self._stack.close()

    def copy(self, i: int, dev_flat, src: int, dst: int, n: int, stream) -> int:
        """Enqueue ``host[i][src:src+n] -> dev_flat[dst:dst+n]`` (element offsets) on ``stream``;
        returns the bytes enqueued."""
        host = self.arrays[i]
        if self._stage is None or (self.mode == "pinned" and i not in self._staged):
            dev_flat[dst:dst + n].copy_to_device(host[src:src + n], stream=stream)
            return n * host.itemsize
        done = 0
        item = host.itemsize
        step = self.stage_bytes // item
        for off in range(0, n, step):
            m = min(step, n - off)
            h = self._half
            if self._stage_ev[h] is not None:
                self._stage_ev[h].synchronize()  # DMA finished reading this half
            buf = self._stage[h][:m * item].view(host.dtype)
            buf[...] = host[src + off:src + off + m]
            dev_flat[dst + off:dst + off + m].copy_to_device(buf, stream=stream)
            done += m * item
            ev = self._stage_ev[h] or cuda.event()
            ev.record(stream)
            self._stage_ev[h] = ev
            self._half = 1 - h
        return done


def _simulator() -> bool:
    import numba
    return bool(numba.config.ENABLE_CUDASIM)


def _spans(arrays, page=mmap.PAGESIZE):
    """``(start, end, member indices)`` of the memory spans holding ``arrays``, merged
    where they share a page."""
    order = sorted(range(len(arrays)), key=lambda i: arrays[i].ctypes.data)
    spans = []
    for i in order:
        a = arrays[i]
        lo, hi = a.ctypes.data, a.ctypes.data + a.nbytes
        if spans and lo // page <= (spans[-1][1] - 1) // page:
            spans[-1][1] = max(spans[-1][1], hi)
            spans[-1][2].append(i)
        else:
            spans.append([lo, hi, [i]])
    return [(lo, hi, members) for lo, hi, members in spans]


def _raw_view(lo, hi) -> np.ndarray:
    """A uint8 array over memory ``[lo, hi)`` that something else keeps alive."""
    return np.ctypeslib.as_array((ctypes.c_uint8 * (hi - lo)).from_address(lo))


def device_buffer(n_elems: int, dtype) -> "cuda.devicearray.DeviceNDArray":
    return cuda.device_array(int(n_elems), dtype=dtype)
