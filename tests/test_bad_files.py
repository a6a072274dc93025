"""Bad files, kept found: a fuzz test of the loader, and every CLI command on a corpus
of damaged files (one ``hybrid: error:`` line, non-zero exit, never a traceback).

The fuzz test mutates a valid tiny GGUF (byte flips in the header and metadata,
truncations, edited keys, values and tensor infos). Every outcome must be a clean
``GGUFError`` or a model whose MoE forward matches the float64 reference. It runs
a few seconds in CI; ``HYBRID_FUZZ_EXAMPLES=5000`` runs longer.
"""
import os
import re
import struct

import numpy as np
import pytest
from gguf import GGUFReader
from hypothesis import HealthCheck, given, settings, strategies as st

from hybrid.cli import main
from hybrid.model import GGUFError, load, write_tiny
from hybrid.moe.cpu import F32_TILES
from hybrid.moe.reference import moe_reference
from hybrid.moe.scheduler import HybridMoE

FUZZ_EXAMPLES = int(os.environ.get("HYBRID_FUZZ_EXAMPLES", "150"))
TINY = dict(n_layers=1, n_embd=32, n_ff=32, n_experts=4, k=2, n_vocab=8, n_head=1, n_head_kv=1, head_dim=32)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A valid file, its bytes, and where its parts are: (kind, start, length) regions."""
    folder = tmp_path_factory.mktemp("fuzz")
    path = write_tiny(folder / "base.gguf", **TINY, seed=int(np.random.SeedSequence().entropy % 2**31))
    r = GGUFReader(path)
    at = r.data.ctypes.data
    pos = lambda a: (a.ctypes.data - at, a.nbytes)  # noqa: E731
    regions = []
    for name, f in r.fields.items():
        if name.startswith("GGUF."):  # version, tensor and kv counts: one value each
            regions.append(("value",) + pos(f.parts[0]))
            continue
        regions += [("key_len",) + pos(f.parts[0]), ("key",) + pos(f.parts[1]), ("type",) + pos(f.parts[2])]
        regions += [("value",) + pos(p) for p in f.parts[3:3 + 4]]  # scalars; array length and first items
    for t in r.tensors:
        regions += [("tensor_" + k,) + pos(p) for k, p in zip(("name_len", "name", "n_dims", "dims", "type",
                                                                   "offset"), t.field.parts)]
    data = path.read_bytes()
    header_end = r.data_offset
    del r
    return Base(folder=folder, data=data, regions=regions, header_end=header_end)


class Base(dict):
    def __repr__(self):  # hypothesis prints the strategy's arguments: not 16 kB of bytes
        return "Base(tiny gguf)"


EDGE = [0, 1, 2, 3, 4, 31, 32, 33, 39, 64, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1]


@st.composite
def mutated(draw, base):
    buf = bytearray(base["data"])
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "flip", "region", "region", "truncate"]))
        if kind == "flip":  # header and metadata bytes
            i = draw(st.integers(0, base["header_end"] - 1))
            if i < len(buf):
                buf[i] ^= draw(st.integers(1, 255))
        elif kind == "truncate" and buf:
            del buf[draw(st.integers(0, len(buf) - 1)):]
        else:  # a key, a value, a tensor info field: an edge number or random bytes
            what, start, n = draw(st.sampled_from(base["regions"]))
            if start + n > len(buf):
                continue
            if n in (4, 8) and draw(st.booleans()):
                v = draw(st.sampled_from(EDGE) | st.integers(0, 2**(8 * n) - 1)) % 2**(8 * n)
                buf[start:start + n] = struct.pack("<I" if n == 4 else "<Q", v)
            else:
                buf[start:start + n] = draw(st.binary(min_size=n, max_size=n))
    return bytes(buf)


def check_outcome(path, x):
    """A clean GGUFError, or a model whose first MoE layer matches the float64 reference.

    A shortened tensor count or a shifted offset can make the data section start
    elsewhere: the weights are then other bytes of the file, which may reach float32's
    range. Such a model must still run (item 6: float32 overflow gives inf, the
    reference may stay finite) or stop with routing's clean error on overflowing logits.
    """
    try:
        model = load(path)
    except GGUFError:
        return "error"
    L = model.layers[0]
    xs = x[:, :L.n_embd] if x.shape[1] >= L.n_embd else np.resize(x, (x.shape[0], L.n_embd))
    xs = np.ascontiguousarray(xs, np.float32)
    try:
        with HybridMoE([L], device="cpu", min_offload_batch=1) as moe:
            out = moe.forward(0, xs, cpu_tiles=F32_TILES)  # float32: the reference's tolerance
    except ValueError as e:
        assert "logits must be finite" in str(e), (path, e)
        return "overflow"
    assert out.dtype == np.float32 and out.shape == xs.shape
    with np.errstate(all="ignore"):
        top = max(np.abs(t.dequantize(e)).max() for t in (L.gate, L.up, L.down) for e in range(L.n_experts))
    if not top < 2.0**40:  # weights where float32 sums can overflow: no agreement promised
        return "huge"
    ids, w = L.route(xs)
    ref = moe_reference(L, xs, ids, w)
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max(), path
    return "model"


def test_loader_fuzz(base):
    path = base["folder"] / "mutant.gguf"
    x = np.random.default_rng().standard_normal((6, 32)).astype(np.float32)
    outcomes = []

    @given(st.data())
    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    def fuzz(data):
        blob = data.draw(mutated(base))
        path.write_bytes(blob)
        outcomes.append(check_outcome(path, x))

    fuzz()
    # Both branches are taken: mutations reach the checks, and some leave a loadable model.
    if os.environ.get("HYBRID_FUZZ_REPORT"):
        print({k: outcomes.count(k) for k in set(outcomes)})
    assert "error" in outcomes and "model" in outcomes


def test_loader_fuzz_regressions(base, tmp_path):
    """Hand-made mutations of the classes llama.cpp and ollama fixed: each a clean GGUFError."""
    data = base["data"]
    regions = {}
    for kind, start, n in base["regions"]:
        regions.setdefault(kind, []).append((start, n))
    cases = {
        "empty": b"",
        "magic only": data[:4],
        "header cut": data[:base["header_end"] // 2],
        "data cut": data[:(base["header_end"] + len(data)) // 2],
    }
    for kind, v in (("tensor_dims", 2**63), ("tensor_n_dims", 2**31), ("tensor_type", 2**31),
                    ("tensor_offset", 2**64 - 1), ("tensor_name_len", 2**64 - 1), ("key_len", 2**64 - 1),
                    ("tensor_dims", 0)):
        start, n = regions[kind][len(regions[kind]) // 2]
        buf = bytearray(data)
        buf[start:start + n] = struct.pack("<I" if n == 4 else "<Q", v % 2**(8 * n))
        cases[f"{kind}={v}"] = bytes(buf)
    for name, blob in cases.items():
        p = tmp_path / "case.gguf"
        p.write_bytes(blob)
        with pytest.raises(GGUFError):
            load(p)
        assert name  # (the case's name shows in a failure's locals)


# ------------------------------------------------------------------ the CLI on a corpus of bad files

@pytest.fixture(scope="module")
def corpus(tmp_path_factory, edit_tensor):
    d = tmp_path_factory.mktemp("corpus")
    good = write_tiny(d / "good.gguf", **TINY, seed=5)
    data = good.read_bytes()
    files = {"missing": d / "missing.gguf", "folder": d / "folder"}
    files["folder"].mkdir()
    if os.path.exists("/dev/null"):
        files["device"] = "/dev/null"
    for name, blob in (("empty", b""), ("junk", b"ABCD" + bytes(64)), ("magic", data[:4]),
                       ("header_cut", data[:600]), ("data_cut", data[:-100]),
                       ("arch", data.replace(b"gpt-oss", b"gpt-zzz", 1))):
        (d / f"{name}.gguf").write_bytes(blob)
        files[name] = d / f"{name}.gguf"

    def poke(v):
        def edit(a):
            a.reshape(-1)[3] = v
        return edit
    files["nan_router"] = edit_tensor(good, d / "nan_router.gguf", "blk.0.ffn_gate_inp.weight", poke(np.nan))
    files["inf_router_b"] = edit_tensor(good, d / "inf_router_b.gguf", "blk.0.ffn_gate_inp.bias", poke(np.inf))
    files["nan_up_b"] = edit_tensor(good, d / "nan_up_b.gguf", "blk.0.ffn_up_exps.bias", poke(np.nan))

    def huge(a):  # finite, but the logits overflow float32 on any hidden state
        a[:] = np.float32(3e38) * np.sign(a)
    files["huge_router"] = edit_tensor(good, d / "huge_router.gguf", "blk.0.ffn_gate_inp.weight", huge)
    return good, files


COMMANDS = {
    "info": [],
    "run": ["-p", "8", "-ub", "8", "--device", "cpu", "--no-progress"],
    "bench": ["-p", "8", "-ub", "8", "--device", "cpu", "--no-progress"],
    "usage": ["-p", "8", "-ub", "8"],
}


def fails_cleanly(capsys, argv, match=""):
    """Non-zero exit with one ``hybrid: error:`` line; any exception escaping main is a traceback."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = [l for l in err.splitlines() if l.strip()]
    assert e.value.code not in (0, None), argv
    assert len(lines) == 1 and lines[0].startswith("hybrid: error:"), (argv, err)
    assert "Traceback" not in err and re.search(match, lines[0], re.I), (argv, lines[0])
    return lines[0]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_on_bad_model_files(capsys, corpus, command):
    _, files = corpus
    expect = {"missing": "not found", "folder": "is a directory", "device": "not a regular file",
              "empty": "not a GGUF", "junk": "not a GGUF", "magic": "truncated", "header_cut": "truncated",
              "data_cut": "truncated", "arch": "not supported", "nan_router": "ffn_gate_inp.weight.*finite",
              "inf_router_b": "ffn_gate_inp.bias.*finite", "nan_up_b": "ffn_up_exps.bias.*finite",
              "huge_router": "logits must be finite"}
    for name, path in files.items():
        if name == "huge_router" and command == "info":
            continue  # loads: info reads no weights
        fails_cleanly(capsys, [command, "-m", path, *COMMANDS[command]], expect[name])


@pytest.mark.parametrize("command", list(COMMANDS))
def test_check_tensors_flag_on_every_command(capsys, corpus, tmp_path, command, edit_tensor):
    good, _ = corpus

    def edit(a):
        a[1, 2, 0] = 255  # expert 1, row 2, first block: exponent 0xFF
    bad = edit_tensor(good, tmp_path / "e255.gguf", "blk.0.ffn_down_exps.weight", edit)
    fails_cleanly(capsys, [command, "-m", bad, "--check-tensors", *COMMANDS[command]],
                  r"ffn_down_exps\.weight.*exponent 255.*expert 1, row 2, column 0")
    assert main([command, "-m", str(good), "--check-tensors", *COMMANDS[command]]) == 0
    capsys.readouterr()


def _npy(path, shape, descr="<f4", payload=b""):
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": shape})
        f.write(payload)
    return path


@pytest.mark.parametrize("command", ["run", "bench", "usage"])
def test_every_command_on_bad_hidden_files(capsys, corpus, tmp_path, command):
    good, _ = corpus
    cases = [
        (_npy(tmp_path / "huge.npy", (10**12, 32), payload=bytes(1024)), r"declares \[1000000000000, 32\]"),
        (_npy(tmp_path / "short.npy", (8, 32), payload=bytes(8 * 32 * 4 - 1)), "file holds 1,023"),
        (_npy(tmp_path / "obj.npy", (8, 32), descr="|O", payload=bytes(64)), "npy"),
        (_npy(tmp_path / "wide.npy", (8, 48), payload=bytes(8 * 48 * 4)), r"\[n_tokens, 32\]"),
        (tmp_path, "npy"),  # a folder
    ]
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY\x09\x00junk")
    cases.append((tmp_path / "junk.npy", "npy"))
    for path, match in cases:
        fails_cleanly(capsys, [command, "-m", good, *COMMANDS[command], "--hidden", path], match)


def test_usage_plot_paths(capsys, corpus, tmp_path):
    good, _ = corpus
    base = ["usage", "-m", good, "-p", "8", "-ub", "8", "--plot"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # every plot is the one matplotlib line
        fails_cleanly(capsys, base + [tmp_path / "x.unknownext"], "matplotlib")
        return
    fails_cleanly(capsys, base + [tmp_path / "x.unknownext"], r"'\.unknownext'.*\.png")
    fails_cleanly(capsys, base + [tmp_path], "is a directory")
    assert main([str(a) for a in base + [tmp_path / "noext"]]) == 0
    out = capsys.readouterr().out
    assert f"heatmap: {tmp_path / 'noext.png'}" in out and (tmp_path / "noext.png").is_file()
    assert not (tmp_path / "noext").exists()


def test_huge_cache_is_capped_not_a_traceback(capsys, corpus):
    good, _ = corpus
    assert main(["run", "-m", str(good), "-p", "8", "--device", "cpu", "--no-progress",
                 "--cache-mb", "1e300"]) == 0
    out, err = capsys.readouterr()
    assert "--cache-mb 1e+300 capped" in out and err.count("\n") <= 1
    assert re.search(r"cache 0\.\d+ MiB", out)
    assert main(["bench", "-m", str(good), "-p", "8", "-ub", "8", "--device", "cpu", "--no-progress",
                 "--variants", "used,used+cache", "--cache-mb", "1e300"]) == 0
    assert "--cache-mb 1e+300 capped" in capsys.readouterr().out


# ------------------------------------------------------------------ 64-bit key forms (issue 23 item 5)

# The FLOAT64/UINT64 forms reach values the 32-bit forms cannot: the reader gives Python
# floats and ints either way, so the values are set in memory (the file forms: test_bad_model_input).
WIDE_FLOATS = [0.0, -0.0, 5e-324, 2.2e-308, 4.54e-05, 0.5, 1.0, -2.885, 1e300, 1.7976931348623157e308,
               -1.7976931348623157e308, float("nan"), float("inf")]
WIDE_INTS = [0, 1, 2, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1, -1, -2**63]
KEY_SUFFIXES = ["rope.scaling.factor", "rope.scaling.yarn_log_multiplier", "rope.scaling.yarn_beta_fast",
                "rope.scaling.yarn_beta_slow", "rope.scaling.yarn_ext_factor", "rope.scaling.attn_factor",
                "rope.freq_base", "attention.layer_norm_rms_epsilon", "attention.sliding_window",
                "context_length", "rope.scaling.original_context_length", "attention.head_count",  # (block_count:
                # the loader refuses it first, for the tensors; in memory it would only allocate)
                "attention.head_count_kv", "attention.key_length", "rope.dimension_count",
                "attention.sliding_window_pattern"]


def test_key_forms_fuzz(base):
    """Any key the whole model reads, at any 64-bit value: a GGUFError from read_config, or a
    model whose prompt runs to finite logits (or stops with a ValueError): never another exception."""
    from hybrid.model.config import read_config
    from hybrid.model.forward import Transformer
    path = base["folder"] / "keys.gguf"
    path.write_bytes(base["data"])
    outcomes = []

    @given(st.sampled_from(KEY_SUFFIXES), st.sampled_from(WIDE_FLOATS + WIDE_INTS))
    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None)
    def fuzz(suffix, value):
        m = load(path)
        m.metadata[f"gpt-oss.{suffix}"] = value
        try:
            read_config(m)
        except GGUFError:
            outcomes.append("error")
            return
        try:
            logits = Transformer(m, n_ctx=4).prefill([1, 2])
        except ValueError:
            outcomes.append("refused")
            return
        assert logits.shape == (2, m.tensors["token_embd.weight"].shape[0])  # NaN: generate's check
        outcomes.append("ran")

    fuzz()
    assert "error" in outcomes and "ran" in outcomes


# ------------------------------------------------------------------ path cases (issue 23 item 2)

@pytest.fixture(scope="module")
def odd_paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("paths")
    (d / "dir").mkdir()
    (d / "loop1").symlink_to(d / "loop2")
    (d / "loop2").symlink_to(d / "loop1")
    (d / "dangling").symlink_to(d / "nowhere")
    return {"empty name": "", "folder": d / "dir", "symlink loop": d / "loop1", "dangling symlink": d / "dangling",
            "device": "/dev/zero"}


@pytest.mark.parametrize("flag, command", [("-m", "info"), ("-m", "run"), ("-f", "run"), ("--hidden", "usage"),
                                           ("--hidden", "run"), ("--logits-out", "run")])
def test_odd_paths_on_every_path_flag(capsys, corpus, odd_paths, tmp_path, flag, command):
    good, _ = corpus
    for name, p in odd_paths.items():
        if flag == "--logits-out" and name == "device":
            p = "/dev/null"
        argv = [command] + ([] if flag == "-m" else ["-m", good]) + [flag, p] + (
            ["--tokens", "1,2", "--no-progress", "-n", "0"] if flag == "--logits-out" else
            ["--no-progress", "-n", "0"] if command == "run" and flag != "--hidden" else [])
        fails_cleanly(capsys, argv)
        assert not (tmp_path / "nowhere").exists() and not os.path.exists("/dev/null.npy"), name
    assert (odd_paths["dangling symlink"]).is_symlink() and not os.path.exists(odd_paths["dangling symlink"])
