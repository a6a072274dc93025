"""PR #15346's comparison on the whole model: the measuring function and ``bench``'s table.

Copied bytes are checked against sums of the file's own tensor sizes and against the
cpu target's planned copies, not against the numbers the sim run reports of itself.
"""
import os
import re

import numpy as np
import pytest

from hybrid.bench import PR_15346, VARIANTS, compare_whole_model, half_the_experts
from hybrid.cli import main
from hybrid.model import load, write_tiny
from hybrid.model.synthetic import synthetic_model
from hybrid.moe.scheduler import HybridMoE

needs_sim = pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") != "1", reason="needs NUMBA_ENABLE_CUDASIM=1")
FOUR = ["all", "used", "used+overlap", "used+cache"]


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """1 block, 4 experts, n_embd 32: the simulator runs a Python thread per GPU thread."""
    return write_tiny(tmp_path_factory.mktemp("m") / "micro.gguf", n_layers=1, n_embd=32, n_ff=32, n_experts=4,
                      k=2, seed=5, n_head=1, n_head_kv=1, head_dim=32, n_vocab=8)


def copy_all_bytes(model) -> int:
    """Bytes copy-all moves per ubatch: every expert tensor of every block, from the tensor table."""
    return sum(t.nbytes for n, t in model.tensors.items() if "_exps." in n)


def tables(out):
    """Each markdown table of ``out`` as (header, rows)."""
    found, cur = [], []
    for line in out.splitlines() + [""]:
        if line.startswith("|"):
            cur.append([c.strip() for c in line.strip("|").split("|")])
        elif cur:
            found.append((cur[0], cur[2:]))
            cur = []
    return found


@needs_sim
def test_compare_whole_model_on_the_simulator():
    from hybrid.model.tiny import simulator_tiles
    model = synthetic_model("gpt-oss-20b", n_layers=2, n_embd=32, n_ff=32, n_experts=6, k=2, n_head=1, n_head_kv=1,
                            head_dim=32, n_vocab=16, n_swa=4)
    prompt = np.random.default_rng().integers(0, 16, 6)
    sim = simulator_tiles()
    snapshots = []  # the used variant's records at each size, taken when the comparison reads its totals

    def make_moe(cache_bytes, **variant):
        moe = HybridMoE(model.layers, device="sim", min_offload_batch=1, tiles=sim.moe, dense_tiles=sim.dense,
                        cache_bytes=cache_bytes, **variant)
        if variant == VARIANTS["used"]:
            totals = moe.stats.totals

            def snapshot_then_totals():
                snapshots.append(list(moe.stats.records))
                return totals()
            moe.stats.totals = snapshot_then_totals
        return moe

    c = compare_whole_model(model, prompt, [3, 6], FOUR, make_moe=make_moe,
                            model_options=dict(dense_tiles=sim.dense, attention_config=sim.attention))
    assert c.device == "sim" and c.variants == FOUR and c.n_prompt == 6 and [ub for ub, _ in c.rows] == [3, 6]
    assert c.cache_bytes == half_the_experts(model.layers)
    used_records = dict(zip([3, 6], snapshots, strict=True))
    # one expert's bytes per block, from the tensor table (not from the backend)
    per_expert = {i: sum(t.nbytes for n, t in model.tensors.items() if n.startswith(f"blk.{i}.") and "_exps." in n)
                  // L.n_experts for i, L in enumerate(model.layers)}
    for ub, res in c.rows:
        assert set(res) == set(FOUR) and all(r["tps"] > 0 for r in res.values())
        n_ub = 6 // ub
        assert res["all"]["mb"] == pytest.approx(n_ub * copy_all_bytes(model) / 6 / 1e6, rel=1e-9)
        # used-only copies each used expert of each layer-ubatch once, no more (the simulator's own
        # routing: a CPU run may route a near-tie otherwise, its hidden states rounded differently)
        recs = used_records[ub]
        assert len(recs) == n_ub * len(model.layers) and all(r.path == "offload" for r in recs)
        assert all(1 <= r.used <= min(6, 2 * ub) for r in recs)
        assert res["used"]["mb"] == pytest.approx(sum(r.used * per_expert[r.layer] for r in recs) / 6 / 1e6,
                                                  rel=1e-9)
        # at least one range per layer-ubatch, at most one per used expert and tensor
        assert len(recs) <= res["used"]["copies"] * 6 <= sum(r.used * len(r.tensors) for r in recs)
        assert res["used+overlap"]["mb"] == res["used"]["mb"]  # same device, same kernels: same routing
        assert 0 < res["used+cache"]["mb"] <= res["used"]["mb"] <= res["all"]["mb"]


@needs_sim
def test_bench_prints_the_comparison_on_sim(capsys, micro):
    assert main(["bench", "-m", str(micro), "-p", "4", "-n", "1", "-ub", "4,8", "--device", "sim",
                 "--min-offload-batch", "1", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    (h1, r1), (h2, r2) = tables(out)
    assert h1 == ["model", "size", "params", "backend", "threads", "n_ubatch", "test", "t/s"]
    assert {r[3] for r in r1} == {"CUDA-sim"} and [r[6] for r in r1] == ["pp4", "tg1"]
    assert "skipped ubatch size 8: larger than -p 4" in out
    assert "PR #15346's comparison: pp4 of the whole model by copy policy, ubatch 4" in out
    assert h2[3:9] == ["t/s all (sim)", "t/s used (sim)", "speedup", "t/s used+overlap (sim)",
                       "speedup used+overlap", "t/s used+cache (sim)"]
    assert [(r[1], r[2]) for r in r2] == [("4", "pp4")]
    col = {h: i for i, h in enumerate(h2)}
    model = load(micro)
    for r in r2:
        assert float(r[col["MB/token all"]]) == pytest.approx(copy_all_bytes(model) / 4 / 1e6, abs=1e-4)
        assert float(r[col["MB/token used"]]) <= float(r[col["MB/token all"]])
        assert re.fullmatch(r"\d+\.\d\dx", r[col["speedup"]])
    assert "sim target: every variant computes the same experts in the simulator" in out
    assert re.search(r"used\+cache: [\d.]+ MiB of VRAM cache \(half the experts", out)
    assert "GPU: the numba-cuda simulator" in out


def test_bench_on_the_cpu_says_why_there_is_no_comparison(capsys, micro):
    assert main(["bench", "-m", str(micro), "-p", "8", "-n", "0", "-ub", "8", "--device", "cpu",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert len(tables(out)) == 1 and "skipped on the cpu target" in out and "CPU: " in out
    # named variants run there too, marked as CPU times: what they show is the planned copies
    assert main(["bench", "-m", str(micro), "-p", "8", "-n", "0", "-ub", "8", "--device", "cpu", "--no-progress",
                 "--variants", "all,used", "--min-offload-batch", "1"]) == 0
    out = capsys.readouterr().out
    (_, _), (h2, r2) = tables(out)
    assert h2[3:6] == ["t/s all (CPU)", "t/s used (CPU)", "speedup"] and len(r2) == 1
    assert float(r2[0][h2.index("MB/token all")]) == pytest.approx(copy_all_bytes(load(micro)) / 8 / 1e6, abs=1e-4)
    assert "cpu target: every variant computes the same experts on the CPU" in out


def test_variants_and_the_prs_table():
    assert set(FOUR) <= set(VARIANTS) and VARIANTS["used+cache"]["overlap"] and not VARIANTS["used"]["overlap"]
    ratios = [after / before for m in PR_15346.values() for before, after in m.values()]
    assert min(ratios) == pytest.approx(1.16, abs=0.01) and max(ratios) == pytest.approx(2.64, abs=0.01)


def test_bad_arguments_fail_before_any_work():
    made = []
    make = lambda **kw: made.append(kw)  # noqa: E731
    with pytest.raises(TypeError, match="either make_moe"):
        compare_whole_model(None, [1], [1], ["all"], device="cpu", make_moe=make)
    with pytest.raises(ValueError, match="unknown variant.*'fast'"):
        compare_whole_model(None, [1], [1], ["all", "fast"], make_moe=make)
    with pytest.raises(ValueError, match="positive ints"):
        compare_whole_model(None, [1], [0], ["all"], make_moe=make)
    assert made == []
