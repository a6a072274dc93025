"""Host memory modes: copies land byte-exact, and failed pinning falls back cleanly."""
import mmap

import numpy as np
import pytest
from numba import cuda

from hybrid.moe import transfer
from hybrid.moe.transfer import HostMemory
from devices import DEVICE_TESTS

pytestmark = DEVICE_TESTS


def arrays():
    rng = np.random.default_rng()
    return [rng.integers(0, 256, (5, 3, 34), dtype=np.uint8),
            rng.standard_normal((5, 7)).astype(np.float32)]


@pytest.mark.parametrize("mode", ["pinned", "staged", "pageable", "auto"])
def test_ranges_copy_exactly_in_every_mode(mode):
    host = arrays()
    mem = HostMemory(host, mode=mode, stage_bytes=40)  # tiny stage: many chunks through both halves
    assert mem.mode == ("pinned" if mode == "auto" else mode)
    s = cuda.stream()
    for i, a in enumerate(host):
        flat = a.reshape(-1)
        per = flat.size // 5
        dev = cuda.to_device(np.zeros(3 * per, a.dtype))
        mem.copy(i, dev, 1 * per, 0, 2 * per, s)  # experts 1..2 into slots 0..1
        mem.copy(i, dev, 4 * per, 2 * per, per, s)  # expert 4 into slot 2
        s.synchronize()
        got = dev.copy_to_host()
        assert np.array_equal(got.view(np.uint8), np.concatenate([flat[per:3 * per], flat[4 * per:]]).view(np.uint8))
    mem.close()


def _pinned_arrays_up_to(nbytes):
    """``cuda.pinned_array`` failing, as a full pinned pool would, for arrays over ``nbytes``."""
    real = cuda.pinned_array

    def pinned_array(shape, dtype=np.float64, **k):
        if np.prod(shape) * np.dtype(dtype).itemsize > nbytes:
            raise MemoryError("no pinned memory left")
        return real(shape, dtype, **k)
    return pinned_array


def test_failed_pinning_falls_back_to_staged(monkeypatch):
    def no_pinning(*a, **k):
        raise MemoryError("cannot page-lock 60 GB")
    monkeypatch.setattr(cuda, "pinned", no_pinning)
    monkeypatch.setattr(cuda, "pinned_array", _pinned_arrays_up_to(1 << 20))
    big = [np.ones(2 << 20, np.uint8)]
    mem = HostMemory(big, mode="auto", stage_bytes=1 << 16)
    assert mem.mode == "staged" and "pinning failed" in mem.note
    with pytest.raises(RuntimeError, match="could not pin"):
        HostMemory(big, mode="pinned")
    # Not even the staging buffer: plain pageable copies, still correct.
    mem = HostMemory(big, mode="auto", stage_bytes=2 << 20)
    assert mem.mode == "pageable" and "staging failed" in mem.note
    dev = cuda.device_array(16, np.uint8)
    mem.copy(0, dev, 5, 0, 16, 0)
    assert (dev.copy_to_host() == 1).all()
    with pytest.raises(RuntimeError, match="staging buffer"):
        HostMemory(big, mode="staged", stage_bytes=2 << 20)


def test_registration_failure_goes_through_the_staged_buffer(monkeypatch):
    # Never a pinned copy of what cannot be registered (for gpt-oss-120b ~61 GB of page-locked RAM)
    def no_register(*a, **k):
        raise RuntimeError("read-only mapping")
    monkeypatch.setattr(cuda, "pinned", no_register)
    monkeypatch.setattr(cuda, "pinned_array", _pinned_arrays_up_to(1 << 12))  # the stage only
    host = arrays()
    mem = HostMemory(host, mode="auto", stage_bytes=64)
    assert mem.mode == "staged" and "could not be registered" in mem.note and mem.host_copies
    assert all(a.ctypes.data == b.ctypes.data for a, b in zip(host, mem.arrays))  # no copies made
    dev = cuda.to_device(np.zeros(host[0].size, np.uint8))
    mem.copy(0, dev, 0, 0, host[0].size, 0)
    assert np.array_equal(dev.copy_to_host(), host[0].reshape(-1))
    with pytest.raises(RuntimeError, match="could not pin .*could not be registered.*staged"):
        HostMemory(host, mode="pinned")


def test_bad_arguments():
    with pytest.raises(ValueError, match="host mode"):
        HostMemory(arrays(), mode="fast")
    with pytest.raises(ValueError, match="stage_bytes"):
        HostMemory(arrays(), mode="staged", stage_bytes=0)
    with pytest.raises(ValueError, match="contiguous"):
        transfer.flat_bytes(np.zeros((4, 4))[:, ::2])


def test_tensors_sharing_pages_are_pinned_as_one_span(monkeypatch):
    # Tensors of one GGUF file sit back to back: registering each would hit pages
    # registered already. One span per run of touching tensors; separate buffers apart.
    pinned = []
    real = cuda.pinned

    def spy(a):
        pinned.append((a.ctypes.data, a.nbytes))
        return real(a)
    monkeypatch.setattr(cuda, "pinned", spy)
    def own_pages(n):  # an anonymous map: nothing else shares its pages
        return np.frombuffer(mmap.mmap(-1, n), np.uint8)
    blob = own_pages(3 * 4096 + 100)
    blob[:] = np.random.default_rng().integers(0, 256, blob.size, dtype=np.uint8)
    parts = [blob[:5000], blob[5000:9000].view(np.float32), blob[9000:]]  # share pages at 4096 and 8192
    other = own_pages(256).view(np.float32)
    other[:] = 1.0
    mem = HostMemory(parts + [other], mode="pinned")
    assert mem.mode == "pinned" and "2 spans" in mem.note
    assert sorted(pinned) == sorted([(blob.ctypes.data, blob.nbytes), (other.ctypes.data, other.nbytes)])
    for a, b in zip(mem.arrays, parts + [other]):
        assert a.ctypes.data == b.ctypes.data  # in place, no copies



def test_a_pin_that_fails_part_way_rolls_back_what_it_registered(monkeypatch):
    # auto mode: the first span registers, the second cannot be registered: the first stays
    # pinned, the second is copied through the staging buffer, and closing unregisters the
    # first; asked for pinned, the first is unregistered before the error, so nothing stays
    # page-locked behind its back.
    import contextlib
    live = []

    @contextlib.contextmanager
    def first_only(a):
        if live or a.nbytes < 4096:
            raise RuntimeError("cannot register")
        live.append(a.ctypes.data)
        try:
            yield a
        finally:
            live.remove(a.ctypes.data)

    monkeypatch.setattr(cuda, "pinned", first_only)
    monkeypatch.setattr(cuda, "pinned_array", _pinned_arrays_up_to(1 << 12))
    blobs = [np.frombuffer(mmap.mmap(-1, 3 * 4096), np.uint8) for _ in range(2)]  # two separate spans
    for b in blobs:
        b[:] = np.random.default_rng().integers(0, 256, b.size, dtype=np.uint8)
    mem = HostMemory(blobs, mode="auto", stage_bytes=1024)
    assert mem.mode == "pinned" and "1 of 2 spans" in mem.note and mem.host_copies
    assert live == [blobs[0].ctypes.data] or live == [blobs[1].ctypes.data]
    for i, b in enumerate(blobs):  # the pinned one directly, the other in stage-sized chunks
        dev = cuda.to_device(np.zeros(b.size, np.uint8))
        mem.copy(i, dev, 0, 0, b.size, 0)
        assert np.array_equal(dev.copy_to_host(), b)
    mem.close()
    assert live == []  # the span registered was unregistered
    with pytest.raises(RuntimeError, match="could not pin"):
        HostMemory(blobs, mode="pinned")
    assert live == []
