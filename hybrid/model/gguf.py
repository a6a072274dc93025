"""GGUF files in: ``load`` a MoE model memory-mapped (the tiny demo model is written by ``tiny``).

``load`` reads the header with ``gguf.GGUFReader`` and hands out views of the
memory map: expert tensors are ``[E, rows, row_bytes]`` uint8 (float16/float32
for F16/F32) slices of the file, never copies, so a 60 GB model costs no RAM
until its pages are touched. Routers and biases are small and decoded to float32.

Every check a bad file can fail raises ``GGUFError`` (a ``ValueError``) naming
the file and the problem, before anything reads past the end of the file.

What loading checks and what it does not (the whole rule, also in the README):
- always: the header, every tensor's type, shape and extent, the hyper-parameters,
  and that the router weights and biases and the expert biases are finite (they
  are small and decoded at load anyway);
- never by default: the expert weights (60 GB on gpt-oss-120b: scanning them
  would make loading cost a full read). ``load(path, check_tensors=True)``
  scans every tensor's data once (``quant.check``: NaN/inf values or scales,
  MXFP4 exponents no finite float32 weights quantise to) and names the first
  bad block, as llama.cpp's ``--check-tensors`` does.
Unchecked bad expert data is not hidden: a NaN reaching the compute comes out
as NaN on every target (see ``hybrid.moe.activation``).
"""
from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFValueType, Keys

from quant import check as qcheck, registry as qregistry, types as qtypes

from ..moe.layer import ExpertTensor, MoELayer
from . import arch as archs
from .errors import GGUFError

__all__ = ["GGUFError", "TensorInfo", "Model", "load", "split_paths", "ARCHS"]


ARCHS = archs.REGISTRY  # the one table of architectures (hybrid/model/arch/)
_SPLIT_RE = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_MAX_META_ARRAY = 64  # longer metadata arrays (tokenizer lists) are left out of Model.metadata


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file: ``shape`` in numpy order (last axis contiguous)."""

    name: str
    ggml_type: int
    shape: tuple
    nbytes: int
    part: int  # index into Model.paths
    offset: int  # absolute byte offset in that part

    @property
    def type_name(self) -> str:
        return qtypes.type_name(self.ggml_type)

    @property
    def ggml_shape(self) -> tuple:
        return tuple(reversed(self.shape))


class _Reader(GGUFReader):
    """GGUFReader that refuses to read past the end, checks tensor extents first
    and steps over long metadata arrays.

    The stock reader silently returns short arrays past the end (a corrupt array
    length can then loop for 2^64 items) and makes no tensor size checks. It
    relies on GGUFReader's internal ``_get``/``_build_fields``/``_build_tensors``
    (gguf 0.19; setup.cfg pins gguf>=0.19).
    """

    def __init__(self, path):
        self._path = Path(path)
        self._size = os.path.getsize(path)
        self.long_arrays: dict[str, int] = {}  # metadata arrays skipped, by key: their lengths
        self.long_array_at: dict[str, tuple[int, int, int]] = {}  # key: (offset of item 0, item type, length)
        super().__init__(path, mode="r")

    def _build_fields(self, offs, count):
        for _ in range(int(count)):
            end = self._skip_long_array(offs)
            offs = end if end is not None else super()._build_fields(offs, 1)
        return offs

    def _skip_long_array(self, offs):
        """Step over a long metadata array (tokenizer lists: 650k strings in gpt-oss).

        The stock parser makes numpy views per item (~30 s for gpt-oss's tokenizer);
        we need only the lengths, read with struct. Returns the end offset, or None
        to let the stock parser handle the field.
        """
        if self.byte_order != "I":
            return None
        mv = memoryview(self.data)
        (klen,) = struct.unpack_from("<Q", self._get(offs, np.uint8, 8))
        pos = offs + 8 + klen
        vtype, itype, alen = struct.unpack_from("<IIQ", self._get(pos, np.uint8, 16))
        if vtype != GGUFValueType.ARRAY or alen <= _MAX_META_ARRAY:
            return None
        pos += 16
        start = pos
        if itype == GGUFValueType.STRING:
            for _ in range(alen):
                if pos + 8 > self._size:
                    pos = self._size + 8  # a string length past the end: truncated, below
                    break
                pos += 8 + struct.unpack_from("<Q", mv, pos)[0]
        elif itype in self.gguf_scalar_to_np:
            pos += alen * np.dtype(self.gguf_scalar_to_np[GGUFValueType(itype)]).itemsize
        else:
            return None  # nested arrays: rare, short
        if pos > self._size:
            raise GGUFError(f"{self._path}: truncated header: metadata array at byte {offs} ends at {pos}, "
                            f"file has {self._size}")
        key = bytes(self.data[offs + 8:offs + 8 + klen]).decode("utf-8", errors="replace")
        self.long_arrays[key] = alen
        self.long_array_at[key] = (start, itype, alen)
        return pos

    def _get(self, offset, dtype, count=1, override_order=None):
        end = int(offset) + np.dtype(dtype).itemsize * int(count)
        if int(count) < 0 or end > self._size:
            raise GGUFError(f"{self._path}: truncated header: needs byte {end}, file has {self._size}")
        return super()._get(offset, dtype, count, override_order)

    def _build_tensors(self, start_offs, fields):
        # llama.cpp's rule (gguf.cpp): tensor i starts where the padded data of
        # tensors 0..i-1 ends, so a size that disagrees with type*shape shows up.
        # Offsets first, then the file's end: a bad size is named as such, not as truncation.
        expect, prev, extents = 0, None, []
        for field in fields:
            _, name_data, _, dims, raw_dtype, offset = field.parts
            name = bytes(name_data).decode("utf-8", errors="replace")
            try:
                t = T(int(raw_dtype[0]))
                block, size = GGML_QUANT_SIZES[t]
            except (ValueError, KeyError):
                raise GGUFError(f"{self._path}: tensor {name!r} has unknown GGML type id "
                                f"{int(raw_dtype[0])}") from None
            ne = [int(d) for d in dims]
            if ne and ne[0] % block:
                raise GGUFError(f"{self._path}: tensor {name!r} ({t.name}) has rows of {ne[0]} elements, "
                                f"not a multiple of the block size {block}")
            nbytes = int(np.prod(ne, dtype=object)) // block * size if ne else size
            if int(offset[0]) != expect:
                raise GGUFError(f"{self._path}: tensor {name!r} starts at data offset {int(offset[0])}, "
                                f"expected {expect}: the bytes stored for {prev} do not match its type and shape")
            extents.append((name, f"{t.name} {ne}", start_offs + expect + nbytes))
            expect += -(-nbytes // self.alignment) * self.alignment
            prev = f"{name!r} ({t.name} {ne})"
        for name, what, end in extents:
            if end > self._size:
                raise GGUFError(f"{self._path}: truncated: tensor {name!r} ({what}) needs bytes up to "
                                f"{end}, the file has {self._size}")
        super()._build_tensors(start_offs, fields)


def _open(path: Path) -> _Reader:
    if not path.exists():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if path.is_dir():
        raise GGUFError(f"{path}: is a directory, not a GGUF file")
    if not path.is_file():
        raise GGUFError(f"{path}: not a regular file (a device, pipe or socket), not a GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        reader = _Reader(path)
    except GGUFError:
        raise
    except Exception as e:  # the parser's own errors on corrupt headers, reworded with the path
        raise GGUFError(f"{path}: corrupt GGUF header: {type(e).__name__}: {e}") from e
    if reader.byte_order != "I":
        raise GGUFError(f"{path}: GGUF file of the other byte order (big-endian) is not supported")
    return reader


def split_paths(path) -> list[Path]:
    """All parts of a split model ``NAME-0000i-of-0000N.gguf`` (any part given), or ``[path]``."""
    path = Path(path)
    m = _SPLIT_RE.match(path.name)
    if not m:
        return [path]
    no, count = int(m["no"]), int(m["count"])
    if not 1 <= no <= count:
        raise GGUFError(f"{path}: split part number {no} is not in 1..{count}")
    paths = [path.with_name(f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise GGUFError(f"{path}: split model of {count} parts is missing {', '.join(missing)} "
                        f"(looked in {path.parent})")
    return paths


def _block_of(name):
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m[1]) if m else None


class Model:
    """A MoE GGUF model: hyper-parameters, MoE layers (memory-mapped experts), all tensors.

    Attributes: ``paths`` (all parts), ``path`` (first), ``arch``, ``n_embd``, ``n_ff``,
    ``n_experts``, ``k``, ``n_layers``, ``layers`` (MoELayer per MoE block; ``index`` is
    the block number), ``dense_blocks`` (blocks with a dense FFN, not in ``layers``),
    ``moe_spec`` (the MoE operation, ``hybrid.moe.spec``, from the architecture and its keys),
    ``tensors`` (name -> TensorInfo, in file order), ``metadata`` (key -> value, first
    part; arrays longer than 64 items, i.e. tokenizer lists, are not parsed: their
    lengths are in ``metadata_array_lengths``).
    """

    def __init__(self, paths, *, check_tensors: bool = False):
        self.paths = [Path(p) for p in paths]
        self._readers = [_open(p) for p in self.paths]
        try:
            self.metadata = {k: f.contents() for k, f in self._readers[0].fields.items()
                             if not k.startswith("GGUF.")}
        except Exception as e:
            raise GGUFError(f"{self.path}: corrupt metadata value: {e}") from e
        self.metadata_array_lengths = dict(self._readers[0].long_arrays)
        self._long_at = dict(self._readers[0].long_array_at)
        self._check_split()
        self.tensors: dict[str, TensorInfo] = {}
        for part, reader in enumerate(self._readers):
            for t in reader.tensors:
                if t.name in self.tensors:
                    raise GGUFError(f"{self.paths[part]}: tensor {t.name!r} also appears in "
                                    f"{self.paths[self.tensors[t.name].part].name}")
                shape = tuple(int(d) for d in reversed(t.shape.tolist()))
                self.tensors[t.name] = TensorInfo(t.name, int(t.tensor_type), shape, int(t.n_bytes),
                                                  part, int(t.data_offset))
        self.arch = self._str("general.architecture")
        archs.get(self.arch, self.path)
        self._read_hparams()
        n_blocks = self.n_layers + self.n_layer_nextn
        beyond = sorted({n for n in self.tensors if (b := _block_of(n)) is not None and b >= n_blocks})
        if beyond:
            self._fail(f"block_count is {n_blocks} but the file has tensors of later blocks: "
                       f"{', '.join(beyond[:4])}{' ...' if len(beyond) > 4 else ''}")
        self.layers: list[MoELayer] = []
        self.dense_blocks: list[int] = []
        for i in range(self.n_layers):
            layer = self._layer(i)
            if layer is None:
                self.dense_blocks.append(i)
            else:
                self.layers.append(layer)
        if not self.layers:
            raise GGUFError(f"{self.path}: no MoE layers (no blk.N.ffn_gate_exps.weight tensors)")
        # all of the file's types join the generated CPU code at once: one compile on the first
        # call, not one more for each type a later layer meets first
        qregistry.activate(*{t.ggml_type for t in self.tensors.values() if qregistry.has(t.ggml_type, "cpu")})
        if check_tensors:
            self.check_tensors()

    # -- metadata -------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self.paths[0]

    def _fail(self, msg):
        raise GGUFError(f"{self.path}: {msg}")

    def _str(self, key):
        v = self.metadata.get(key)
        if not isinstance(v, str):
            self._fail(f"metadata key {key} is missing or not a string")
        return v

    def _int(self, key, default=None):
        v = self.metadata.get(key, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            self._fail(f"metadata key {key} = {v!r} is not a non-negative integer")
        return v

    def _check_split(self):
        n = len(self.paths)
        count = self.metadata.get(Keys.Split.LLM_KV_SPLIT_COUNT, 1)
        if count != n:
            self._fail(f"{Keys.Split.LLM_KV_SPLIT_COUNT} = {count} but {n} part file(s) were found "
                       f"(split files must be named NAME-00001-of-{count:05d}.gguf)" if isinstance(count, int)
                       else f"bad {Keys.Split.LLM_KV_SPLIT_COUNT} = {count!r}")
        if n == 1:
            return
        total = 0
        for i, (p, r) in enumerate(zip(self.paths, self._readers)):
            f = r.fields.get(Keys.Split.LLM_KV_SPLIT_NO)
            if f is None or f.contents() != i:
                raise GGUFError(f"{p}: expected {Keys.Split.LLM_KV_SPLIT_NO} = {i}, found "
                                f"{None if f is None else f.contents()}")
            total += len(r.tensors)
        want = self.metadata.get(Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)
        if want != total:
            self._fail(f"split parts hold {total} tensors, "
                       f"{Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT} says {want}")

    def _read_hparams(self):
        a = self.arch
        key = lambda k: k.format(arch=a)  # noqa: E731
        L = Keys.LLM
        self.n_layers = self._int(key(L.BLOCK_COUNT))
        # Next-token-prediction blocks follow the trunk; llama.cpp's graph skips them, so do we.
        self.n_layer_nextn = self._int(key(L.NEXTN_PREDICT_LAYERS), 0)
        if self.n_layers is not None:
            if self.n_layer_nextn >= self.n_layers:
                self._fail(f"{key(L.NEXTN_PREDICT_LAYERS)} = {self.n_layer_nextn} leaves no trunk of the "
                           f"{self.n_layers} blocks")
            self.n_layers -= self.n_layer_nextn
        self.n_embd = self._int(key(L.EMBEDDING_LENGTH))
        self.n_experts = self._int(key(L.EXPERT_COUNT), 0)
        self.k = self._int(key(L.EXPERT_USED_COUNT), 0)
        if self.n_layers is None or self.n_embd is None:
            self._fail(f"metadata keys {key(L.BLOCK_COUNT)} and {key(L.EMBEDDING_LENGTH)} are required")
        if not self.n_experts:
            self._fail(f"not a Mixture-of-Experts model ({key(L.EXPERT_COUNT)} is missing or 0)")
        if not 1 <= self.k <= self.n_experts:
            self._fail(f"{key(L.EXPERT_USED_COUNT)} = {self.k} is not in 1..{self.n_experts}")
        self.n_ff = self._int(key(L.EXPERT_FEED_FORWARD_LENGTH))
        self.arch_def = spec = archs.get(a, self.path)
        if self.n_ff is None and spec.n_ff_from_feed_forward:
            ff = self.metadata.get(key(L.FEED_FORWARD_LENGTH))
            self.n_ff = ff if isinstance(ff, int) else None
        self.moe_spec = spec.moe_spec(lambda k: self.metadata.get(key(k)), f"{self.path}: ")

    def metadata_array(self, key: str):
        """A metadata array in full, also the long ones ``metadata`` leaves out (parsed now, from
        the memory map: a list of str for strings, else a numpy array); None when absent."""
        if key not in self._long_at:
            v = self.metadata.get(key)
            if v is None or isinstance(v, list):
                return v
            self._fail(f"metadata key {key} is not an array")
        start, itype, n = self._long_at[key]
        data = self._readers[0].data
        if itype != GGUFValueType.STRING:
            dt = np.dtype(self._readers[0].gguf_scalar_to_np[GGUFValueType(itype)])
            return np.asarray(data[start:start + n * dt.itemsize].view(dt))
        mv, out, pos = memoryview(data), [], start
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(n):  # offsets were checked against the file's end when the header was read
            (ln,) = unpack(mv, pos)
            out.append(bytes(mv[pos + 8:pos + 8 + ln]).decode("utf-8", errors="replace"))
            pos += 8 + ln
        return out

    # -- tensors --------------------------------------------------------------------

    def raw(self, name: str) -> np.ndarray:
        """The stored data of a tensor, a read-only view of the memory map (no copy).

        float32/float16 for F32/F16, else uint8 ``shape[:-1] + (row_bytes,)``.
        """
        info = self._info(name)
        mm = self._readers[info.part].data[info.offset:info.offset + info.nbytes]
        if info.ggml_type == T.F32:
            return mm.view(np.float32).reshape(info.shape)
        if info.ggml_type == T.F16:
            return mm.view(np.float16).reshape(info.shape)
        block, size = GGML_QUANT_SIZES[T(info.ggml_type)]
        return mm.reshape(info.shape[:-1] + (info.shape[-1] // block * size,))

    def tensor(self, name: str) -> np.ndarray:
        """A tensor decoded to float32 in numpy order (a copy); any type ``quant.types`` decodes."""
        info = self._info(name)
        return qtypes.dequantize(self.raw(name), info.ggml_type, info.shape)

    def _info(self, name):
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def _small(self, name, shape):
        info = self.tensors[name]
        if info.shape != shape:
            self._fail(f"{name} has shape {info.shape}, expected {shape}")
        try:
            return self.tensor(name)
        except NotImplementedError as e:
            self._fail(f"{name}: {e}")

    def _experts(self, name, rows, cols):
        info = self.tensors[name]
        if not qregistry.has(info.ggml_type, "cpu"):  # the expert types the backend decodes
            self._fail(f"{name} has type {info.type_name}; supported expert types: "
                       f"{', '.join(qregistry.type_name(t) for t in qregistry.types('cpu'))}")
        if info.shape != (self.n_experts, rows, cols):
            self._fail(f"{name} has shape {info.shape} (ggml {list(info.ggml_shape)}), expected "
                       f"{(self.n_experts, rows, cols)} = [n_experts, rows, cols]")
        return ExpertTensor(self.raw(name), info.ggml_type, rows, cols)

    def _layer(self, i):
        p = f"blk.{i}."
        names = {n: p + n for n in ("ffn_gate_inp.weight", "ffn_gate_exps.weight", "ffn_up_exps.weight",
                                    "ffn_down_exps.weight")}
        if self.arch_def.layer_kind(self.tensors.__contains__, i) == "dense":
            return None  # a dense FFN block (leading dense layers; the forward runs them)
        if p + "ffn_gate.0.weight" in self.tensors:
            self._fail(f"block {i} stores one tensor per expert (old Mixtral GGUF layout); "
                       "re-convert it with a current llama.cpp (ffn_*_exps tensors)")
        biases = ("ffn_gate_inp.bias", "ffn_gate_exps.bias", "ffn_up_exps.bias", "ffn_down_exps.bias")
        need = list(names.values()) + ([p + b for b in biases] if self.arch_def.expert_biases else [])
        need += [p + "exp_probs_b.bias"] if self.arch_def.selection_bias is True else []
        missing = [n for n in need if n not in self.tensors]
        if missing:
            self._fail(f"missing tensor(s) {', '.join(missing)} (arch {self.arch})")
        E, D = self.n_experts, self.n_embd
        if self.n_ff is None:  # from the tensor itself, then checked like the others
            self.n_ff = self.tensors[names["ffn_gate_exps.weight"]].shape[1]
        F = self.n_ff
        opt = lambda n, shape: self._small(p + n, shape) if p + n in self.tensors else None  # noqa: E731
        try:
            return MoELayer(
                router_w=self._small(names["ffn_gate_inp.weight"], (E, D)),
                router_b=opt("ffn_gate_inp.bias", (E,)),
                gate=self._experts(names["ffn_gate_exps.weight"], F, D),
                up=self._experts(names["ffn_up_exps.weight"], F, D),
                down=self._experts(names["ffn_down_exps.weight"], D, F),
                gate_b=opt("ffn_gate_exps.bias", (E, F)), up_b=opt("ffn_up_exps.bias", (E, F)),
                down_b=opt("ffn_down_exps.bias", (E, D)),
                k=self.k, spec=self.moe_spec, select_b=opt("exp_probs_b.bias", (E,)), index=i)
        except GGUFError:
            raise
        except (ValueError, TypeError) as e:
            self._fail(f"block {i}: {e}")

    def check_tensors(self) -> None:
        """Scan every tensor's data (reads the whole file once); GGUFError at the first bad block.

        Types ``quant.check`` knows (F32, F16, BF16, Q8_0, MXFP4) are checked; others are skipped.
        """
        for info in self.tensors.values():
            bad = qcheck.first_bad(self.raw(info.name), info.ggml_type)
            if bad is not None:
                at = [int(i) for i in np.unravel_index(bad[0], info.shape)]
                where = (f"expert {at[0]}, row {at[1]}, column {at[2]}" if len(at) == 3
                         else f"index {at}")
                raise GGUFError(f"{self.paths[info.part]}: tensor {info.name!r} ({info.type_name}) holds {bad[1]} "
                                f"at {where} (checked because check_tensors was asked for)")

    # -- reports --------------------------------------------------------------------

    @property
    def expert_bytes(self) -> int:
        return sum(t.raw.nbytes for layer in self.layers for t in layer.tensors().values())

    @property
    def file_bytes(self) -> int:
        return sum(os.path.getsize(p) for p in self.paths)

    def describe(self, per_layer: bool = False) -> str:
        """A short markdown report: hyper-parameters, tensor types, optionally each MoE layer."""
        by_type: dict[str, list[int]] = {}
        for t in self.tensors.values():
            c = by_type.setdefault(t.type_name, [0, 0])
            c[0] += 1
            c[1] += t.nbytes
        lines = [f"**{self.metadata.get('general.name') or self.path.name}** ({self.arch}, "
                 f"{len(self.paths)} file(s), {self.file_bytes / 2**20:.1f} MiB)", "",
                 f"- blocks {self.n_layers} (MoE {len(self.layers)}), n_embd {self.n_embd}, "
                 f"n_ff {self.n_ff}, experts {self.n_experts}, used {self.k}",
                 f"- gating {self.moe_spec.legacy_gating}, activation {self.moe_spec.activation}, "
                 f"renormalize {self.moe_spec.norm}",
                 f"- experts {self.expert_bytes / 2**20:.1f} MiB of {len(self.tensors)} tensors",
                 "", "| type | tensors | MiB |", "|---|---:|---:|"]
        lines += [f"| {k} | {n} | {b / 2**20:.2f} |" for k, (n, b) in sorted(by_type.items())]
        if per_layer:
            lines += ["", "| tensor | type | ggml shape | MiB | expert slab B |", "|---|---|---|---:|---:|"]
            for layer in self.layers:
                for name, t in layer.tensors().items():
                    info = self.tensors[name]
                    lines.append(f"| {name} | {info.type_name} | {list(info.ggml_shape)} | "
                                 f"{info.nbytes / 2**20:.2f} | {t.slab_bytes} |")
        return "\n".join(lines)

    def __repr__(self):
        return (f"Model({self.path.name!r}, arch={self.arch!r}, layers={len(self.layers)}, "
                f"n_embd={self.n_embd}, n_ff={self.n_ff}, experts={self.n_experts}, k={self.k})")


def load(path, *, check_tensors: bool = False) -> Model:
    """Open a GGUF MoE model (the first part of a split model finds the others).

    Cheap at any size: expert weights are memory-mapped, not read. ``check_tensors``
    also scans every tensor's data (a full read; see ``Model.check_tensors``).
    """
    if not isinstance(check_tensors, bool):
        raise TypeError(f"check_tensors must be a bool, got {type(check_tensors).__name__}")
    model = Model(split_paths(path), check_tensors=check_tensors)
    from .sigbus import watch
    watch(model.paths)  # a file truncated while mapped: a message naming it, not a silent SIGBUS
    return model
