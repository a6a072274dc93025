"""The format registry: one ``Format`` subclass per GGML type, registered by its id.

As gguf-py's ``quants.py`` does, a format registers itself when its class is
defined::

    class Q8_0(Format, ggml_type=T.Q8_0):
        decode_block = ...

Block geometry comes from ``gguf.constants.GGML_QUANT_SIZES`` (never retyped);
only an id gguf does not know (a test's toy format) states ``block`` and
``block_bytes`` itself. Every capability is a query on the registry, never a
list kept elsewhere: ``types(cap)`` for ``"decode"``, ``"cpu"``, ``"check"``,
``"cuda_tile"``, ``"cuda_pair"``, ``"cuda_dequantize"``, ``"mma"``, ``"int8_dot"``,
``"simd"``, ``"ir_block"``.

The contract a format codes against (class attributes; hooks are ``None``
when absent):

- ``ggml_type`` (int), ``name``, ``block`` (elements per block), ``block_bytes``;
- ``decode_numpy(blocks)`` (staticmethod): uint8 ``[n, block_bytes]`` ->
  float32 ``[n, block]``, bit-identical to ``gguf.quants.dequantize``;
  required;
- ``decode_block``: ``@njit(inline="always")`` ``(src uint8[::1], off,
  out float32[::1], o)`` writing the block at byte ``off`` of ``src`` to
  ``out[o:o+block]``; the generated CPU dispatcher calls it;
- ``decode_run`` (optional fast path): ``@njit(inline="always")``
  ``(raw, off, nblk, out, o)``, ``nblk >= 1`` consecutive blocks from flat byte
  ``off`` of any C-contiguous uint8 array (MXFP4: the SIMD decoder);
- ``cuda_decode_block``: the numba-cuda device function of ``decode_block``'s
  signature;
- ``check_blocks(blocks)`` (staticmethod): uint8 ``[n, block_bytes]`` ->
  bool ``[n]``, True where a block holds a value no finite tensor quantises to
  (NaN/inf scale); ``check_what(raw)`` names the fault of the bad block's bytes ``raw``;
- ``cuda_tile(rows, k_chunk, n_threads, stride)`` (classmethod): the device
  function decoding a transposed ``rows x k_chunk`` tile into shared memory
  (``quant.cuda.tile_decoder``'s contract; ``quant.cuda.block_tile_decoder`` builds it from
  ``cuda_decode_block``, and ``cuda_tile_parts`` says its K step may divide the block); ``cuda_pair(...)`` the pair
  reader of dense rows (``quant.cuda.pair_reader``); ``cuda_dtype`` the element
  dtype device kernels read its rows as;
- ``ir_block(b, isa_mode, lanes, p8, off)`` (staticmethod): LLVM IR emitting the
  32 elements at byte ``off`` as ``32 // lanes`` float vectors (the CPU block dots;
  ``isa_mode`` from ``quant.simd.mode``); ``simd_run(isa)`` the
  intrinsic factory behind ``decode_run``; ``int8_dot``: the CPU integer dot
  path exists (``quant.simd``'s u8 x i8 kernels), with ``int8_block`` (LLVM IR of one block of 32
  as unsigned bytes, value + ``int8_offset``, its scale, optionally a min) or ``int8_scales``
  (super-blocks of 256 whose sub-block scales and mins are integers under a float d and dmin:
  the sub-block dots add up in integers; bytes at most 127 on every ISA, or with
  ``int8_signed`` the signed values) and ``int8_avx2`` (those bytes are at most 127, so AVX2's
  vpmaddubsw cannot saturate); ``mma``: a tensor-core kernel exists (``cuda_bf16_tile`` decodes
  its tiles to BF16 pieces).

Numba cannot call through a dict, so ``cpu_decoder()`` generates the njit
dispatcher (an if/elif chain over the registered formats' ``decode_block``)
and ``jit`` compiles consumers whose on-disk cache is keyed on the registry's
``fingerprint()``; both are rebuilt when a format registers or unregisters (consumers on
their next call, from the disk cache where that set of formats was compiled before).
A format with ``compile_on_use`` (the legacy, K-, i- and ternary quants) joins the
generated code only when an entry point ``activate``s it for a tensor of its type:
a model of common types compiles five decoders, not twenty-five (first run of the
built-in model 24 s -> 14 s), and a type reached before activation raises.
"""
from __future__ import annotations

import os
import sys

import numba as nb
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

from .jitcache import KeyedCache

__all__ = ["Format", "get", "formats", "types", "has", "fingerprint", "unregister", "cpu_decoder", "jit",
           "type_name", "row_nbytes", "block_size", "dequantize", "on_change", "require"]

CAPABILITIES = ("decode", "cpu", "check", "cuda_tile", "cuda_pair", "cuda_dequantize", "mma", "int8_dot", "simd",
                "ir_block")
_FORMATS: dict[int, type] = {}
_ACTIVE: set = set()  # ids compiled into the generated code (``activate``)
_LISTENERS: list = []


class Format:
    """Base of every format; a subclass given ``ggml_type=`` registers itself."""

    ggml_type: int = -1
    name: str = ""
    block: int = 0
    block_bytes: int = 0
    decode_block = None
    decode_run = None
    cuda_decode_block = None
    check_blocks = None
    cuda_tile = None
    cuda_tile_parts = False  # True: cuda_tile also takes K steps that divide the block (256 by 32)
    cuda_pair = None
    cuda_bf16_tile = None
    cuda_dequantize = None
    cuda_dtype = np.uint8
    ir_block = None
    simd_run = None
    int8_dot = False
    int8_block = None  # (b, p8, off) -> (<32 x i8> value + int8_offset as unsigned bytes, float32 scale[, min]):
    #                    scale * (u - int8_offset) - min
    int8_offset = 0  # what int8_block adds to each value so that it is unsigned
    int8_avx2 = False  # whether vpmaddubsw can take int8_block's bytes (all <= 127: no i16 saturation)
    int8_scales = None  # super-blocks of 256, integer scales: (b, p8, off) -> (d, dmin or None, 8 x <32 x i8> u,
    #                     <16 x i16> sc, <16 x i16> mn or None), per 16 values: d*sc*(u - int8_offset) - dmin*mn
    int8_signed = False  # the bytes are the signed values (offset 0): with VNNI value + 128, else
    #                      vpmaddubsw(|v|, q * sign(v)) (|v| <= 127; 128 too for blocks of 32)
    scale_offsets = None  # byte offsets of a block's f16 scales (where tests and benchmarks write finite ones)
    mma = False
    compile_on_use = False  # True: in the generated code only once ``activate``d (a rarely used type)

    @staticmethod
    def decode_numpy(blocks):
        raise NotImplementedError

    @classmethod
    def check_what(cls, raw):
        return "a NaN or inf block scale"

    def __init_subclass__(cls, ggml_type=None, **kw):
        super().__init_subclass__(**kw)
        if ggml_type is None:
            return  # an abstract family base
        gid = int(ggml_type)
        try:
            qt = T(gid)
        except ValueError:
            qt = None
        if qt is not None and qt in GGML_QUANT_SIZES:
            cls.block, cls.block_bytes = GGML_QUANT_SIZES[qt]
        elif not (cls.__dict__.get("block") and cls.__dict__.get("block_bytes")):
            raise ValueError(f"format {cls.__name__}: GGML id {gid} is not in gguf's GGML_QUANT_SIZES; "
                             f"state block and block_bytes")
        cls.ggml_type = gid
        cls.name = cls.__dict__.get("name") or (qt.name if qt is not None else cls.__name__)
        if cls.decode_numpy is Format.decode_numpy:
            raise TypeError(f"format {cls.name}: decode_numpy is required")
        if gid in _FORMATS:
            raise ValueError(f"GGML type {gid} is already registered (by {_FORMATS[gid].__module__})")
        _FORMATS[gid] = cls
        if not cls.compile_on_use:
            _ACTIVE.add(gid)
        _changed()


def unregister(ggml_type) -> None:
    """Remove a format (tests that register a toy one clean up with this)."""
    if _FORMATS.pop(int(ggml_type), None) is not None:
        _ACTIVE.discard(int(ggml_type))
        _changed()


def activate(*ggml_types) -> None:
    """Compile these registered formats into the generated code (formats with
    ``compile_on_use`` join it only when a caller first needs them, so a model of common
    types does not compile the decoders of twenty others). Entry points that reach the
    generated dispatchers call this after their type check."""
    if all(t in _ACTIVE for t in ggml_types):  # the common case, on every CPU expert call
        return
    new = {_int(t) for t in ggml_types} & set(_FORMATS) - _ACTIVE
    if new:
        _ACTIVE.update(new)
        _changed()


def compiled_formats() -> list:
    """The formats the generated code holds, in id order."""
    return [f for f in formats() if f.ggml_type in _ACTIVE]


def get(ggml_type):
    """The format class of a GGML id; NotImplementedError naming the registered ones if none."""
    f = _FORMATS.get(_int(ggml_type))
    if f is None:
        raise NotImplementedError(f"GGML type {type_name(ggml_type)} is not supported "
                                  f"(supported: {', '.join(f.name for f in formats())})")
    return f


def require(ggml_type, cap: str = "decode", what: str = "quant"):
    """The format of ``ggml_type`` if it has capability ``cap``, else NotImplementedError naming
    the id (unknown to gguf) or the formats that have it."""
    f = _FORMATS.get(_int(ggml_type))
    if f is not None and _capable(f, cap):
        return f
    try:
        T(int(ggml_type))
    except (TypeError, ValueError):
        if f is None:
            raise NotImplementedError(f"{what}: unknown GGML type id {ggml_type}") from None
    raise NotImplementedError(f"{what}: GGML type {type_name(ggml_type)} is not supported "
                              f"(supported: {', '.join(type_name(t) for t in types(cap))})")


def formats() -> list:
    """Registered formats in id order."""
    return [_FORMATS[k] for k in sorted(_FORMATS)]


def has(ggml_type, cap: str = "decode") -> bool:
    f = _FORMATS.get(_int(ggml_type))
    return f is not None and _capable(f, cap)


def types(cap: str = "decode") -> tuple:
    """GGML ids (as gguf's enum where it knows them) of the formats with capability ``cap``."""
    return tuple(_enum(f.ggml_type) for f in formats() if _capable(f, cap))


def _capable(f, cap):
    if cap not in CAPABILITIES:
        raise ValueError(f"unknown capability {cap!r} (one of {', '.join(CAPABILITIES)})")
    if cap == "decode":
        return True
    if cap == "cpu":
        return f.decode_block is not None
    if cap == "check":
        return f.check_blocks is not None
    if cap in ("mma", "int8_dot"):
        return bool(getattr(f, cap))
    if cap == "simd":
        return f.simd_run is not None
    return getattr(f, cap) is not None


def _int(t):
    try:
        return int(t)
    except (TypeError, ValueError):
        return -1


def _enum(gid):
    try:
        return T(gid)
    except ValueError:
        return gid


def type_name(ggml_type) -> str:
    f = _FORMATS.get(_int(ggml_type))
    if f is not None:
        return f.name
    try:
        return T(int(ggml_type)).name
    except (TypeError, ValueError):
        return f"unknown GGML type {ggml_type}"


def block_size(ggml_type) -> int:
    f = _FORMATS.get(_int(ggml_type))
    return f.block if f is not None else GGML_QUANT_SIZES[T(int(ggml_type))][0]


def row_nbytes(ggml_type, n: int) -> int:
    """Bytes of ``n`` consecutive elements (a row) of this type."""
    f = _FORMATS.get(_int(ggml_type))
    block, size = (f.block, f.block_bytes) if f is not None else GGML_QUANT_SIZES[T(int(ggml_type))]
    if n % block:
        raise ValueError(f"{type_name(ggml_type)} rows must be a multiple of {block} elements, got {n}")
    return n // block * size


def dequantize(raw: np.ndarray, ggml_type: int, shape) -> np.ndarray:
    """Decode the bytes of a tensor of ``ggml_type`` into float32 ``shape`` (numpy order,
    last axis contiguous). Bit-identical to ``gguf.quants.dequantize`` for every format."""
    f = require(ggml_type, "decode", "dequantize")
    if not isinstance(raw, np.ndarray):
        raise TypeError("dequantize: raw must be a numpy array")
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape) or not shape:
        raise ValueError(f"dequantize: bad shape {shape}")
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    n = int(np.prod(shape))
    need = n // shape[-1] * row_nbytes(f.ggml_type, shape[-1]) if n else 0
    if raw.size != need:
        raise ValueError(f"dequantize: {raw.size} bytes do not hold a {f.name} tensor of shape {shape} "
                         f"({need} bytes)")
    if n == 0:
        return np.zeros(shape, dtype=np.float32)
    return f.decode_numpy(raw.reshape(-1, f.block_bytes)).reshape(shape)


# ---------------------------------------------------------------- generated code

def fingerprint() -> tuple:
    """What compiled consumers depend on: each format's id, class and its module file's stamp
    (so editing a format module invalidates the consumers' on-disk caches too)."""
    out = []
    for f in compiled_formats():
        mod = sys.modules.get(f.__module__)
        path = getattr(mod, "__file__", None)
        try:
            st = os.stat(path) if path else None
            stamp = (st.st_mtime_ns, st.st_size) if st else None
        except OSError:
            stamp = None
        out.append((f.ggml_type, f.__module__, f.__qualname__, stamp))
    return tuple(out)


_DISPATCH = None


def cpu_decoder():
    """The njit dispatcher ``decode(raw, wtype, e, r, c0, n, out, o)``: ``out[o + c] =
    W[e, r, c0 + c]`` for ``c < n``, ``raw`` uint8 ``[E, rows, row_bytes]``, ``wtype`` the GGML
    id, ``c0`` and ``n`` whole blocks inside the row (the caller checks). Generated from the
    registry: one branch per format with ``decode_block`` (its ``decode_run`` when it has one)."""
    global _DISPATCH
    if _DISPATCH is None:
        _DISPATCH = _build_dispatch()
    return _DISPATCH


def _build_dispatch():
    ns, lines = {"np": np}, ["def decode(raw, wtype, e, r, c0, n, out, o):", "    row = raw[e, r]"]
    kw = "if"
    for f in compiled_formats():
        if f.decode_block is None:
            continue
        g, B, BB = f.ggml_type, f.block, f.block_bytes
        lines.append(f"    {kw} wtype == {g}:")
        if f.decode_run is not None:
            ns[f"run_{g}"] = f.decode_run
            lines += [f"        if n >= {B}:",
                      f"            run_{g}(raw, (e * raw.shape[1] + r) * raw.shape[2] + c0 // {B} * {BB}, "
                      f"n // {B}, out, o)"]
        else:
            ns[f"blk_{g}"] = f.decode_block
            lines += [f"        for b in range(n // {B}):",
                      f"            blk_{g}(row, (c0 // {B} + b) * {BB}, out, o + b * {B})"]
        kw = "elif"
    if kw == "if":
        lines.append("    pass")
    else:  # a registered type not yet activate()d must fail loudly, never leave out unwritten
        lines += ["    else:", "        raise ValueError('quant.cpu.decode: this GGML type is not compiled in "
                  "(quant.registry.activate it first)')"]
    exec(compile("\n".join(lines), "<quant.registry.cpu_decoder>", "exec"), ns)
    return nb.njit(inline="always")(ns["decode"])


class _RegistryCache(KeyedCache):
    """numba's on-disk cache, its key extended by the registry's fingerprint: a consumer
    compiled against one set of formats is never loaded for another."""

    def _index_key(self, sig, codegen):
        return super()._index_key(sig, codegen) + (fingerprint(),)


_CONSUMERS: list = []


def jit(**kw):
    """``numba.njit`` for functions that reach the generated dispatchers: ``cache=True`` keys the
    cache on ``fingerprint()``, and they recompile when the registry changes."""
    cache = kw.pop("cache", False)

    def wrap(fn):
        d = nb.njit(**kw)(fn)
        if cache:
            d._cache = _RegistryCache(d.py_func)
        _CONSUMERS.append(d)
        return d
    return wrap


def on_change(fn):
    """Call ``fn()`` after every registration change (modules rebinding generated code)."""
    _LISTENERS.append(fn)
    return fn


def _changed():
    global _DISPATCH
    _DISPATCH = None
    for fn in list(_LISTENERS):
        fn()
    for d in _CONSUMERS:
        if d.overloads:
            # Lazily: the next call compiles, or loads from the disk cache under the new
            # fingerprint. Not ``recompile()``: it compiles every consumer at once and flushes
            # its disk cache, so each registry change would cost every fingerprint's compile again.
            d._make_finalizer()()
            d._reset_overloads()
