"""The command line on small GGUF files: every command, on the cpu and sim targets, and its errors.

Counts are checked against the float64 reference router and against byte sums
taken from the layers themselves, not against the scheduler's own numbers.
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from hybrid import cli, report
from hybrid.moe import traffic
from hybrid.cli import main
from hybrid.model import load, write_tiny
from hybrid.moe.reference import route_reference, router_logits_reference

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
needs_sim = pytest.mark.skipif(not SIM, reason="needs NUMBA_ENABLE_CUDASIM=1")
USAGE_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight: (\d+)/(\d+) experts used$")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """2 MoE layers, 8 experts, k=2: the cpu-target tests."""
    return write_tiny(tmp_path_factory.mktemp("m") / "small.gguf", n_layers=2, n_embd=64, n_ff=64,
                      n_experts=8, k=2, seed=3, n_vocab=16)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """1 MoE layer, 4 experts: the simulator runs a thread per GPU thread, so keep it tiny."""
    return write_tiny(tmp_path_factory.mktemp("m") / "micro.gguf", n_layers=1, n_embd=32, n_ff=32,
                      n_experts=4, k=2, seed=5, n_head=1, n_head_kv=1, head_dim=32, n_vocab=8)


def run_cli(capsys, *argv):
    assert main([str(a) for a in argv]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return out


def fails(capsys, *argv, match=""):
    """The command exits with code 2 and one line on stderr, no traceback."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("hybrid: error:"), err
    assert re.search(match, lines[0], re.I), lines[0]
    return lines[0]


def usage_lines(out):
    return [l for l in out.splitlines() if USAGE_RE.match(l)]


def ref_used(layer, x):
    """Experts the float64 reference router picks for the tokens x."""
    ids, _ = route_reference(router_logits_reference(layer, x), layer.k, layer.gating, layer.renormalize)
    return np.unique(ids).size


def expert_bytes(layer):
    """Bytes of one expert over every tensor the scheduler copies (weights and biases)."""
    n = sum(t.raw[0].nbytes for t in layer.tensors().values())
    return n + sum(b[0].nbytes for b in (layer.gate_b, layer.up_b, layer.down_b) if b is not None)


def number(out, pattern):
    m = re.search(pattern, out)
    assert m, f"{pattern!r} not in output:\n{out}"
    return float(m.group(1))


def copied_bytes(out):
    return int(re.search(r"\(([\d,]+) B,", out).group(1).replace(",", ""))


# ------------------------------------------------------------------ info

def test_info_reports_the_model(capsys, small):
    out = run_cli(capsys, "info", "-m", small, "--per-layer")
    for s in ("gpt-oss", "blocks 2 (MoE 2)", "n_embd 64", "experts 8, used 2", "MXFP4", "Q8_0",
              "blk.1.ffn_down_exps.weight"):
        assert s in out
    per_layer = 8 * expert_bytes(load(small).layers[0])  # what run copies per layer: weights and biases
    assert number(out, r"copy-all moves ([\d.]+) MB") == pytest.approx(per_layer / 1e6, abs=0.005)


def test_without_m_the_builtin_model_is_written_and_used(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_MOE_CACHE", str(tmp_path))
    out = run_cli(capsys, "info")
    assert (tmp_path / "tiny-gpt-oss-32x4-tok.gguf").is_file()
    assert "tiny-gpt-oss" in out and "experts 32, used 4" in out


# ------------------------------------------------------------------ run

def test_run_cpu_usage_lines_and_bytes(capsys, small):
    model = load(small)
    p, ub = 80, 32  # three ubatches; the last (16 tokens) is below 32: the CPU path
    out = run_cli(capsys, "run", "--moe-only", "-m", small, "-p", p, "-ub", ub, "--policy", "all",
                  "--device", "cpu", "--seed", 7, "--no-progress")
    assert "device: cpu, host memory: none" in out and "CPU times" in out
    assert "SYNTHETIC" in out and "not the model's own activations" in out
    lines = usage_lines(out)
    assert len(lines) == 3 * len(model.layers)
    # the last ubatch ran on the CPU (copies nothing): the lines are the last offloaded one's
    assert "experts used, ubatch 1 (32 tokens); the last ubatch (16 tokens) ran on the CPU:" in out
    x = traffic.synthetic_hidden(p, model.n_embd, 7)[32:64]
    for line in lines:
        blk, _, used, total = USAGE_RE.match(line).groups()
        layer = model.layers[int(blk)]
        assert int(total) == 8 and int(used) == ref_used(layer, x)
    assert "layer-ubatches: 4 offloaded, 2 on the CPU" in out
    # copy-all: every expert of every tensor, one copy per tensor, per offloaded layer-ubatch
    want = 4 * 8 * expert_bytes(model.layers[0])
    assert copied_bytes(out) == want
    assert number(out, r"copies: (\d+)") == 4 * 6
    assert number(out, r"tokens: (\d+)") == p and number(out, r"([\d.]+) t/s") > 0


def test_run_used_copies_less_and_cache_hits(capsys, small):
    args = ("run", "--moe-only", "-m", small, "-p", 128, "-ub", 32, "--device", "cpu", "--no-progress")
    all_b = copied_bytes(run_cli(capsys, *args, "--policy", "all"))
    used = run_cli(capsys, *args)
    assert "cache hits" not in used  # no cache: no hit count to report
    used_b = copied_bytes(used)
    cached = run_cli(capsys, *args, "--cache-mb", 1)  # room for every expert of both layers
    model = load(small)
    x = traffic.synthetic_hidden(128, model.n_embd, 0)
    want = sum(ref_used(L, x[s:s + 32]) * expert_bytes(L) for L in model.layers for s in range(0, 128, 32))
    assert used_b == want < all_b
    assert number(cached, r"cache hits: (\d+)") > 0
    assert copied_bytes(cached) < used_b


def test_run_hidden_file(capsys, small, tmp_path):
    model = load(small)
    x = np.random.default_rng(11).standard_normal((40, model.n_embd))  # float64: converted
    f = tmp_path / "h.npy"
    np.save(f, x)
    out = run_cli(capsys, "run", "-m", small, "--hidden", f, "-ub", 16, "--device", "cpu", "--no-progress")
    assert f"hidden states: {f} (40 tokens)" in out and "SYNTHETIC" not in out
    last = x[32:].astype(np.float32)
    for line in usage_lines(out):
        blk, _, used, _ = USAGE_RE.match(line).groups()
        assert int(used) == ref_used(model.layers[int(blk)], last)
    out = run_cli(capsys, "run", "-m", small, "--hidden", f, "-p", 20, "-ub", 16, "--device", "cpu",
                  "--no-progress")
    assert "tokens: 20," in out


def test_run_rejects_bad_hidden_files(capsys, small, tmp_path):
    def save(name, a):
        np.save(tmp_path / name, a)
        return tmp_path / name
    base = ("run", "-m", small, "--device", "cpu", "--hidden")
    fails(capsys, *base, save("w.npy", np.ones((8, 48), np.float32)), match=r"\[n_tokens, 64\].*\[8, 48\]")
    fails(capsys, *base, save("d.npy", np.ones(64, np.float32)), match=r"\[n_tokens, 64\]")
    fails(capsys, *base, save("i.npy", np.ones((8, 64), np.int32)), match="float")
    fails(capsys, *base, save("n.npy", np.full((8, 64), np.nan, np.float32)), match="NaN")
    fails(capsys, *base, save("ok.npy", np.ones((8, 64), np.float32)), "-p", 9, match="holds 8 tokens")
    fails(capsys, *base, tmp_path / "missing.npy", match="not found")
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    fails(capsys, *base, tmp_path / "junk.npy", match="npy")


@needs_sim
def test_run_sim_matches_cpu_usage(capsys, micro):
    args = ("run", "--moe-only", "-m", micro, "-p", 6, "-ub", 6, "--min-offload-batch", 1, "--no-progress")
    sim = run_cli(capsys, *args, "--device", "sim")
    cpu = run_cli(capsys, *args, "--device", "cpu")
    assert "device: sim, host memory: pinned" in sim and "simulator" in sim
    assert usage_lines(sim) == usage_lines(cpu) and len(usage_lines(sim)) == 3
    assert "layer-ubatches: 1 offloaded, 0 on the CPU" in sim
    assert "experts used, ubatch 0 (6 tokens), the last:" in sim
    assert copied_bytes(sim) == copied_bytes(cpu) > 0


# ------------------------------------------------------------------ bench

def parse_table(out):
    rows = [l for l in out.splitlines() if l.startswith("|")]
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    assert all(len(c) == len(cells[0]) for c in cells)
    assert all(re.fullmatch(r"-+:?", c) for c in cells[1])
    return cells[0], cells[2:]


def test_bench_cpu_table(capsys, small):
    model = load(small)
    out = run_cli(capsys, "bench", "--moe-only", "-m", small, "-p", 64, "-ub", "32,64,128", "--device", "cpu",
                  "--variants", "all,used,used+cache", "--no-progress")
    assert "skipped ubatch sizes larger than the prompt: 128" in out
    head, rows = parse_table(out)
    assert head[:6] == ["model", "ubatch", "test", "t/s all (CPU)", "t/s used (CPU)", "speedup"]
    assert head[-3:] == ["copies/token all", "copies/token used", "copies/token used+cache"]
    assert "MB/token all" in head and "MB/token used" in head and "speedup used+cache" in head
    assert [r[1] for r in rows] == ["32", "64"] and {r[0] for r in rows} == {"tiny-gpt-oss"}
    assert {r[2] for r in rows} == {"pp64"}
    col = {h: i for i, h in enumerate(head)}
    for ub, r in zip((32, 64), rows):
        all_mb = float(r[col["MB/token all"]])
        n_ub = 64 // ub
        assert all_mb == pytest.approx(n_ub * 2 * 8 * expert_bytes(model.layers[0]) / 64 / 1e6, abs=1e-4)
        assert float(r[col["copies/token all"]]) == pytest.approx(n_ub * 2 * 6 / 64, abs=1e-3)
        assert 0 < float(r[col["MB/token used+cache"]]) <= float(r[col["MB/token used"]]) <= all_mb
        assert r[col["speedup"]].endswith("x") and float(r[col["t/s all (CPU)"]]) > 0


@needs_sim
def test_bench_sim(capsys, micro):
    out = run_cli(capsys, "bench", "--moe-only", "-m", micro, "-p", 5, "-ub", 5, "--device", "sim",
                  "--min-offload-batch", 1,
                  "--no-progress")
    head, rows = parse_table(out)
    assert head[3:6] == ["t/s all (sim)", "t/s used (sim)", "speedup"] and len(rows) == 1
    col = {h: i for i, h in enumerate(head)}
    assert float(rows[0][col["MB/token used"]]) < float(rows[0][col["MB/token all"]])


# ------------------------------------------------------------------ usage

def test_usage_table_matches_reference(capsys, small):
    model = load(small)
    out = run_cli(capsys, "usage", "-m", small, "-p", 50, "-ub", 16, "--seed", 2)
    head, rows = parse_table(out)
    assert head == ["layer", "ub0", "ub1", "ub2", "ub3", "mean"] and len(rows) == 2
    x = traffic.synthetic_hidden(50, model.n_embd, 2)
    for layer, row in zip(model.layers, rows):
        want = [ref_used(layer, x[s:s + 16]) for s in range(0, 50, 16)]
        assert row[0] == str(layer.index) and [int(v) for v in row[1:5]] == want
        assert float(row[5]) == pytest.approx(np.mean(want), abs=0.05)


def test_usage_plot(capsys, small, tmp_path, monkeypatch):
    png = tmp_path / "u.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        fails(capsys, "usage", "-m", small, "-p", 32, "-ub", 16, "--plot", png, match=r"matplotlib.*\[plot\]")
        assert not png.exists()
    else:
        out = run_cli(capsys, "usage", "-m", small, "-p", 32, "-ub", 16, "--plot", png)
        assert f"heatmap: {png}" in out and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        for name in ("matplotlib", "matplotlib.figure"):  # as if the extra were not installed
            monkeypatch.setitem(sys.modules, name, None)
        fails(capsys, "usage", "-m", small, "-p", 32, "-ub", 16, "--plot", tmp_path / "v.png",
              match=r"matplotlib.*\[plot\]")


# ------------------------------------------------------------------ errors

def test_model_errors(capsys, tmp_path, small):
    fails(capsys, "info", "-m", tmp_path / "nope.gguf", match="not found")
    (tmp_path / "junk.gguf").write_bytes(b"ABCD" + bytes(64))
    fails(capsys, "run", "-m", tmp_path / "junk.gguf", match="not a GGUF")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(small.read_bytes()[:20_000])
    fails(capsys, "usage", "-m", cut, match="truncated")
    fails(capsys, "info", "-m", tmp_path, match="is a directory")  # a folder


@pytest.mark.parametrize("argv, match", [
    (["run", "-p", "0"], r"-p.*>= 1"),
    (["run", "-p", "abc"], r"-p.*not an integer"),
    (["run", "-ub", "-4"], r"-ub.*>= 1"),
    (["run", "--cache-mb", "-1"], r"cache-mb.*non-negative"),
    (["run", "--cache-mb", "nan"], r"cache-mb"),
    (["run", "--device", "tpu"], r"--device"),
    (["bench", "-ub", "64,x"], r"-ub.*not an integer"),
    (["bench", "--variants", "all,fast"], r"unknown variant.*fast"),
    (["bench", "-p", "16", "-ub", "32,64"], r"exceeds -p 16"),
    (["run", "-p", str(cli.MAX_TOKENS + 1)], r"more than"),
    (["usage", "--seed", "-1"], r"--seed"),
    ([], r"required"),
    (["frobnicate"], r"invalid choice"),
])
def test_bad_numbers_and_flags(capsys, small, argv, match):
    if argv and argv[0] in cli.COMMANDS:
        argv = argv + ["-m", str(small)]
    fails(capsys, *argv, match=match)


def test_device_errors(capsys, small):
    # sim on: asking for a real GPU is an error; sim off: asking for sim is.
    fails(capsys, "run", "-m", small, "-p", 8, "--device", "sim" if not SIM else "cuda",
          match="NUMBA_ENABLE_CUDASIM" if SIM else "NUMBA_ENABLE_CUDASIM|sim")
    fails(capsys, "run", "-m", small, "-p", 8, "--device", "cpu", "--layout", "natural", "--device-mb", 0.01,
          match="device memory")


# ------------------------------------------------------------------ helpers and entry point

def test_synthetic_hidden():
    a = traffic.synthetic_hidden(300, 64, seed=1)
    assert a.dtype == np.float32 and a.shape == (300, 64) and np.isfinite(a).all()
    assert np.allclose(np.sqrt((a.astype(np.float64) ** 2).mean(axis=1)), 1.0, atol=1e-5)
    assert np.array_equal(a, traffic.synthetic_hidden(300, 64, seed=1))
    assert not np.allclose(a, traffic.synthetic_hidden(300, 64, seed=2))
    # topics: neighbours are more alike than tokens far apart
    cos = lambda u, v: (u * v).sum(1) / 64  # noqa: E731  (RMS 1 rows)
    assert cos(a[:-1], a[1:]).mean() > cos(a[:150], a[150:]).mean() + 0.2


def test_bench_table_columns():
    rows = [(128, {"all": dict(tps=100.0, mb=2.0, copies=0.5), "used": dict(tps=150.0, mb=1.0, copies=0.75)})]
    head, body = parse_table(report.bench_table("m", 512, rows, ["all", "used"]))
    assert head == ["model", "ubatch", "test", "t/s all", "t/s used", "speedup", "MB/token all",
                    "MB/token used", "copies/token all", "copies/token used"]
    assert body == [["m", "128", "pp512", "100.0", "150.0", "1.50x", "2.0000", "1.0000", "0.500", "0.750"]]


def test_python_m_hybrid(small):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    ok = subprocess.run([sys.executable, "-m", "hybrid", "info", "-m", str(small)], capture_output=True,
                        text=True, env=env, timeout=120)
    assert ok.returncode == 0 and "gpt-oss" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "hybrid", "run", "-p", "0"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


# ------------------------------------------------------------------ doctor

def test_doctor_without_a_gpu_says_so_and_what_to_install(monkeypatch, capsys):
    from hybrid import doctor
    monkeypatch.setattr(doctor, "_libraries", lambda: {"nvrtc": None, "nvJitLink": None, "cudart": "/x/libcudart.so",
                                                       "nvvm": "/x/libnvvm.so"})
    d = doctor.diagnose(copy_mb=0)
    assert not d.ready and d.gpu is None and d.copy is None
    text = "\n".join(doctor.render(d))
    assert "nvrtc MISSING" in text and "fix:" in text
    if d.simulator:  # the suite runs with the simulator on: doctor names it
        assert "NUMBA_ENABLE_CUDASIM=1" in text and "simulator: ON" in text
    else:
        assert "pip install 'hybrid-moe[cuda" in text
    # Through the command line: clean output, exit code 1, no traceback.
    with pytest.raises(SystemExit) as e:
        main(["doctor", "--copy-mb", "0"])
    assert e.value.code == 1
    out, err = capsys.readouterr()
    assert "not ready for --device cuda" in out and "Traceback" not in err


def test_doctor_picks_the_extra_from_the_driver():
    from hybrid.doctor import extra_for
    assert extra_for((13, 0)) == "cuda13" and extra_for((12, 8)) == "cuda12" and extra_for(None) == "cuda12"


def test_doctor_without_the_simulator_in_a_subprocess():
    # No driver on a CI machine: doctor must still end cleanly, naming what is missing.
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    r = subprocess.run([sys.executable, "-m", "hybrid", "doctor", "--copy-mb", "0"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.returncode in (0, 1)
    assert ("ready: --device cuda" in r.stdout) if r.returncode == 0 else ("fix:" in r.stdout)


# ------------------------------------------------------------------ the whole model

@pytest.fixture(scope="module")
def talker(tmp_path_factory):
    """A small gpt-oss with a trained tokenizer and a window of 8: run and bench on text."""
    return write_tiny(tmp_path_factory.mktemp("m") / "talker.gguf", n_layers=2, n_embd=64, n_ff=64,
                      n_experts=8, k=2, seed=6, n_vocab=400, n_swa=8)


def test_info_describes_the_whole_model(capsys, talker, small):
    out = run_cli(capsys, "info", "-m", talker)
    assert "attention: 4 heads, 2 KV heads, head_dim 32, sinks, sliding window 8 on 1 of 2 layers" in out
    assert "YaRN factor 32 (original context 4096)" in out
    assert "tokenizer: byte-level BPE, pre-tokenizer 'gpt-4o', 400 tokens, chat template" in out
    assert "tokenizer: none usable" in run_cli(capsys, "info", "-m", small)


def test_run_text_through_the_whole_model(capsys, talker):
    from hybrid.model.forward import Transformer
    from hybrid.model.tokenizer import Tokenizer
    out = run_cli(capsys, "run", "-m", talker, "--prompt", "Why is the sky blue?", "-n", 5, "--no-progress")
    model = load(talker)
    ids = Tokenizer.from_model(model).encode("Why is the sky blue?")
    assert f"prompt: {len(ids)} tokens (text 'Why is the sky blue?')" in out
    assert "weights are random" in out and "[5 tokens, stopped: n]" in out
    assert "experts used, prompt ubatch 0" in out and len(usage_lines(out)) == 6
    assert number(out, r"generation: 5 tokens, (\d+) decode steps") == 4
    assert number(out, r"pp ([\d.]+) t/s") > 0 and number(out, r"tg ([\d.]+) t/s") > 0
    # the usage lines are the prompt's own routing: layer 0 sees rmsnorm(h + attention(h))
    tr = Transformer(model, n_ctx=len(ids))
    tr.prefill(ids)
    want = {r.layer: r.used for r in tr.moe.stats.records}
    for line in usage_lines(out):
        blk, _, used, _ = USAGE_RE.match(line).groups()
        assert int(used) == want[int(blk)]


def test_run_tokens_and_logits_out(capsys, talker, tmp_path):
    from hybrid.model.forward import Transformer
    f = tmp_path / "logits.npy"
    toks = [5, 17, 300, 2, 2, 9, 40, 41, 42, 43, 44]  # longer than the window
    out = run_cli(capsys, "run", "-m", talker, "--tokens", ",".join(map(str, toks)), "-n", 0, "-ub", 4,
                  "--logits-out", f, "--no-progress")
    assert "prompt: 11 tokens (--tokens)" in out and "in 3 ubatch(es)" in out and "generated" not in out
    got = np.load(f)
    assert got.dtype == np.float32 and got.shape == (11, 400)
    want = Transformer(load(talker), n_ctx=11, n_ubatch=4).prefill(toks)
    assert np.array_equal(got, want)


def test_run_file_chat_and_sampling(capsys, talker, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("Once upon a time\n", encoding="utf-8")
    a = run_cli(capsys, "run", "-m", talker, "-f", f, "--chat", "-n", 6, "--temp", 0.8, "--top-p", 0.9,
                "--seed", 1, "--no-progress")
    assert "chat template" in a and "temp 0.8, top-p 0.9, seed 1" in a
    b = run_cli(capsys, "run", "-m", talker, "-f", f, "--chat", "-n", 6, "--temp", 0.8, "--top-p", 0.9,
                "--seed", 1, "--no-progress")
    gen = lambda o: o.split("):\n", 1)[1].split("\n[", 1)[0]  # noqa: E731
    assert gen(a) == gen(b)


def test_run_whole_model_errors(capsys, talker, small, tmp_path):
    fails(capsys, "run", "-m", talker, "--tokens", "1,400", match=r"id 400 is outside the vocabulary \[0, 400\)")
    fails(capsys, "run", "-m", talker, "--tokens", "1,x", match="token ids")
    fails(capsys, "run", "-m", talker, "--prompt", "Why is the sky blue?", "-c", 3, match="exceed the context of 3")
    (tmp_path / "empty.txt").write_text("")
    fails(capsys, "run", "-m", talker, "-f", tmp_path / "empty.txt", match="empty")
    fails(capsys, "run", "-m", talker, "-f", tmp_path / "nope.txt", match="not found")
    fails(capsys, "run", "-m", small, "--prompt", "hi", match="no tokenizer")
    fails(capsys, "run", "-m", talker, "--top-p", 0, match="top-p")
    fails(capsys, "run", "-m", talker, "--temp", -1, match="temp")
    fails(capsys, "run", "-m", talker, "--tokens", "1,2", "--logits-out", tmp_path / "no" / "x.npy",
          match="cannot write")
    out = run_cli(capsys, "run", "-m", small, "-p", 40, "-n", 2, "--no-progress")  # no tokenizer: random ids
    assert "40 random token ids" in out
    assert "experts used, prompt ubatch 0 (40 tokens, offload path, copies planned)" in out


def test_bench_whole_model_table(capsys, talker):
    out = run_cli(capsys, "bench", "-m", talker, "-p", 40, "-n", 3, "-ub", "16,40,64", "--no-progress")
    head, rows = parse_table(out)
    assert head == ["model", "size", "params", "backend", "threads", "n_ubatch", "test", "t/s"]
    assert [(r[5], r[6]) for r in rows] == [("16", "pp40"), ("16", "tg3"), ("40", "pp40"), ("40", "tg3")]
    assert {r[3] for r in rows} == {"CPU"} and all(float(r[7].split(" ± ")[0]) > 0 for r in rows)
    assert "skipped ubatch size 64" in out
