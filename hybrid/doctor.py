"""``python -m hybrid doctor``: is this machine ready to run the experts on its GPU, and if not, what to install.

``diagnose()`` gathers the facts (never raises): the numba / numba-cuda
versions, whether the simulator is on, the CUDA driver and its CUDA version,
the GPU (name, compute capability, SMs, VRAM), the CUDA libraries numba-cuda
loads (NVRTC, nvJitLink, the runtime, libNVVM) and, with a GPU, a pinned vs
pageable host-to-device copy of a few hundred MB. ``render()`` turns them
into lines; every problem comes with the exact command that fixes it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

# What numba-cuda loads. NVRTC and nvJitLink come with the cuda12/cuda13 extras
# (numba-cuda's cu12/cu13 extras); NVVM compiles the kernels.
LIBRARIES = ("nvrtc", "nvJitLink", "cudart", "nvvm")
NEEDED = ("nvrtc", "nvvm")  # without these the first kernel compile fails
MIN_CC = (7, 0)  # oldest compute capability numba-cuda 0.30 targets
COPY_MB = 256


@dataclass
class Diagnosis:
    versions: dict = field(default_factory=dict)
    simulator: bool = False
    driver: tuple | None = None  # CUDA version the driver supports, e.g. (12, 8)
    driver_error: str = ""
    gpu: dict | None = None  # name, cc, sms, vram_total, vram_free
    libraries: dict = field(default_factory=dict)  # name -> path, or None when missing
    copy: dict | None = None  # pinned / pageable GB/s
    problems: list = field(default_factory=list)  # (what, how to fix)

    @property
    def ready(self) -> bool:
        return not self.problems and self.gpu is not None


def extra_for(driver) -> str:
    """The install extra matching a driver's CUDA version: cuda13 from 13, else cuda12."""
    return "cuda13" if driver and driver[0] >= 13 else "cuda12"


def _versions():
    out = {}
    for mod, name in (("numba", "numba"), ("numba_cuda", "numba-cuda"), ("numpy", "numpy")):
        try:
            out[name] = __import__(mod).__version__
        except Exception:  # pragma: no cover - reported, not fatal
            out[name] = "not installed"
    try:
        from importlib.metadata import version
        out["cuda-bindings"] = version("cuda-bindings")
    except Exception:
        out["cuda-bindings"] = "not installed"
    return out


def _libraries():
    out = {}
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib
    except Exception:
        return dict.fromkeys(LIBRARIES)
    for name in LIBRARIES:
        try:
            out[name] = load_nvidia_dynamic_lib(name).abs_path or "loaded"
        except Exception:
            out[name] = None
    return out


def copy_test(nbytes: int, reps: int = 3) -> dict:
    """Host-to-device GB/s from pinned and from pageable memory (one buffer of ``nbytes``)."""
    from numba import cuda
    dev = cuda.device_array(nbytes, np.uint8)
    out = {}
    pageable = np.ones(nbytes, np.uint8)
    pinned = cuda.pinned_array(nbytes, np.uint8)
    pinned[:] = 1
    for name, host in (("pinned", pinned), ("pageable", pageable)):
        dev.copy_to_device(host)  # first touch, driver staging set up
        cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            dev.copy_to_device(host)
        cuda.synchronize()
        out[name] = reps * nbytes / (time.perf_counter() - t) / 1e9
    out["bytes"] = nbytes
    return out


def diagnose(copy_mb: int = COPY_MB) -> Diagnosis:
    """Everything ``render`` prints; ``copy_mb=0`` skips the copy test."""
    import numba
    d = Diagnosis(versions=_versions(), simulator=bool(numba.config.ENABLE_CUDASIM))
    d.libraries = _libraries()
    if d.simulator:
        d.problems.append(("NUMBA_ENABLE_CUDASIM=1 is set: numba-cuda runs the simulator, not the GPU",
                           "unset NUMBA_ENABLE_CUDASIM (the simulator is for tests)"))
        return d
    from numba import cuda
    from numba.cuda.cudadrv import driver as drv
    try:
        d.driver = tuple(drv.driver.get_version())
    except Exception as e:
        lines = [ln.strip(" :") for ln in str(e).splitlines() if ln.strip(" :")]
        lines = [ln for ln in lines if not ln.startswith("Error at")] or lines
        d.driver_error = lines[0] if lines else type(e).__name__
    extra = extra_for(d.driver)
    missing = [n for n in NEEDED if not d.libraries.get(n)]
    if missing:
        d.problems.append((f"CUDA libraries not found: {', '.join(missing)} (the first kernel compile needs them)",
                           f"pip install 'hybrid-moe[{extra}]'  (cuda13 for drivers of CUDA 13, cuda12 for CUDA 12)"))
    if d.driver is None:
        d.problems.append(("no NVIDIA driver (libcuda) could be loaded: no GPU to run on"
                           + (f" ({d.driver_error})" if d.driver_error else ""),
                           "install the NVIDIA driver; until then use --device cpu"))
        return d
    if d.driver < (12, 0):
        d.problems.append((f"the driver supports CUDA {d.driver[0]}.{d.driver[1]}; numba-cuda needs 12.0 or newer",
                           "upgrade the NVIDIA driver"))
    if not cuda.is_available():
        d.problems.append(("the driver loads but numba-cuda finds no usable GPU", "check nvidia-smi"))
        return d
    dev = cuda.get_current_device()
    cc = tuple(dev.compute_capability)
    free, total = cuda.current_context().get_memory_info()
    name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    d.gpu = dict(name=name, cc=cc, sms=int(dev.MULTIPROCESSOR_COUNT), vram_total=int(total), vram_free=int(free))
    if cc < MIN_CC:
        d.problems.append((f"compute capability {cc[0]}.{cc[1]} is older than {MIN_CC[0]}.{MIN_CC[1]}",
                           "use --device cpu"))
    if copy_mb:
        try:
            d.copy = copy_test(min(copy_mb << 20, int(free) // 2))
        except Exception as e:
            d.problems.append((f"copy test failed: {e}", "check that pinned memory can be allocated (ulimit -l)"))
    return d


def render(d: Diagnosis) -> list[str]:
    v = d.versions
    lines = [f"numba {v.get('numba')}, numba-cuda {v.get('numba-cuda')}, cuda-bindings {v.get('cuda-bindings')}, "
             f"numpy {v.get('numpy')}"]
    if d.simulator:
        lines.append("simulator: ON (NUMBA_ENABLE_CUDASIM=1): kernels run on the CPU, no GPU is used")
    if d.driver:
        lines.append(f"driver: supports CUDA {d.driver[0]}.{d.driver[1]} (install extra: [{extra_for(d.driver)}])")
    elif not d.simulator:
        lines.append(f"driver: not found{f' ({d.driver_error})' if d.driver_error else ''}")
    if d.gpu:
        g = d.gpu
        lines.append(f"GPU: {g['name']}, compute capability {g['cc'][0]}.{g['cc'][1]}, {g['sms']} SMs, "
                     f"VRAM {g['vram_total'] / 2**30:.1f} GiB ({g['vram_free'] / 2**30:.1f} GiB free)")
    elif not d.simulator:
        lines.append("GPU: none")
    lines.append("CUDA libraries: " + ", ".join(f"{n} {p if p else 'MISSING'}" for n, p in d.libraries.items()))
    if d.copy:
        c = d.copy
        lines.append(f"host-to-device copy of {c['bytes'] / 2**20:.0f} MiB: pinned {c['pinned']:.1f} GB/s, "
                     f"pageable {c['pageable']:.1f} GB/s ({c['pinned'] / c['pageable']:.1f}x)")
    if d.ready:
        lines.append("ready: --device cuda will run the expert kernels on this GPU")
    else:
        lines.append("not ready for --device cuda:" if d.problems else "not ready for --device cuda")
        for what, fix in d.problems:
            lines.append(f"  - {what}\n    fix: {fix}")
        lines.append("everything else works without a GPU: --device cpu (and the simulator for tests)")
    return lines
