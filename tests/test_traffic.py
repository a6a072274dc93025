"""hybrid.moe.traffic: synthetic routing calibrated to PR #15346's expert-use lists."""
import re
from pathlib import Path

import numpy as np
import pytest

from hybrid.moe.routing import route
from hybrid.moe.traffic import (PRESETS, TrafficPreset, calibration_table, format_calibration,
                            synthetic_logits, used_experts)

PR_TEXT = Path("/work/shared/reference/llama.cpp-pr-15346.txt")
# PR #15346, gpt-oss-120b, a code prompt: experts used per layer (of 128).
OBSERVED = {512: (50, 95, 75.2), 2048: (84, 128, 105.4)}  # min, max, mean


def test_observed_numbers_match_the_pr_text():
    if not PR_TEXT.exists():
        pytest.skip("PR discussion not in this checkout")
    text = PR_TEXT.read_text().split("BS 2048")
    for ub, part in zip((512, 2048), text):
        v = [int(m) for m in re.findall(r"ffn_up_exps\.weight: (\d+)/128", part)]
        assert (min(v), max(v), round(sum(v) / len(v), 1)) == OBSERVED[ub]


@pytest.mark.parametrize("seed", [0, 1])
def test_120b_lands_in_observed_ranges(seed):
    rows = {r["ubatch"]: r for r in calibration_table("gpt-oss-120b", (512, 2048), seed=seed)}
    for ub, (lo, hi, mean) in OBSERVED.items():
        r = rows[ub]
        assert len(r["per_layer"]) == 36
        assert lo <= r["min"] and r["max"] <= hi, (ub, r["min"], r["max"])
        assert abs(r["mean"] - mean) < 8, (ub, r["mean"])
    # like the PR's lists, deeper layers use fewer experts
    per = rows[512]["per_layer"]
    assert per[:12].mean() > per[-12:].mean()


def test_uniform_uses_nearly_all():
    for r in calibration_table("uniform", (512, 2048), layers=range(0, 36, 3)):
        assert r["min"] >= 126, r


def test_used_grows_with_ubatch_and_table_prints(capsys):
    rows = calibration_table("gpt-oss-20b", (128, 512, 2048), layers=range(0, 24, 4), show=True)
    means = [r["mean"] for r in rows]
    assert means == sorted(means) and means[0] < means[-1] <= 32
    # 20b assumption: the fraction used at ubatch 512 is 120b's (~0.58), not all 32
    assert 0.45 * 32 <= means[1] <= 0.7 * 32
    out = capsys.readouterr().out
    assert "| 2048 |" in out and "gpt-oss-20b" in out
    assert format_calibration("x", rows).count("\n") == 3 + len(rows)


def test_logits_shape_dtype_determinism():
    for name, p in PRESETS.items():
        z = synthetic_logits(name, 50, layer=p.n_layers - 1, seed=3)
        assert z.shape == (50, p.n_experts) and z.dtype == np.float32
        assert np.all(np.isfinite(z))
        np.testing.assert_array_equal(z, synthetic_logits(name, 50, layer=p.n_layers - 1, seed=3))
        assert not np.array_equal(z, synthetic_logits(name, 50, layer=p.n_layers - 1, seed=4))
    assert synthetic_logits("uniform", 0).shape == (0, 128)


def test_windows_do_not_depend_on_the_cut():
    whole = synthetic_logits("gpt-oss-120b", 1100, layer=5, seed=2)
    for start, n in ((0, 7), (255, 2), (300, 512), (700, 400)):
        part = synthetic_logits("gpt-oss-120b", n, layer=5, seed=2, start=start)
        np.testing.assert_array_equal(part, whole[start:start + n])


def test_locality_consecutive_tokens_share_experts():
    def overlap(name):
        ids, _ = route(synthetic_logits(name, 2048, layer=10), 4)
        same = lambda a, b: np.mean([len(set(x) & set(y)) for x, y in zip(a.tolist(), b.tolist())])
        shuffled = ids[np.random.default_rng(0).permutation(len(ids))]
        return same(ids[:-1], ids[1:]), same(shuffled[:-1], shuffled[1:])

    near, far = overlap("gpt-oss-120b")
    assert near > far + 0.1
    near, far = overlap("uniform")
    assert abs(near - far) < 0.1


def test_ubatches_of_one_prompt_share_popular_experts():
    a = used_experts("gpt-oss-120b", 512, layer=7, seed=0, start=0)
    b = used_experts("gpt-oss-120b", 512, layer=7, seed=0, start=512)
    c = used_experts("gpt-oss-120b", 512, layer=7, seed=9, start=512)
    assert a.dtype == np.int32 and np.all(np.diff(a) > 0)
    jac = lambda x, y: len(np.intersect1d(x, y)) / len(np.union1d(x, y))
    assert jac(a, b) > jac(a, c) + 0.1


def test_custom_preset_and_bad_input():
    p = TrafficPreset("tiny", 8, 2, 2, skew=1.0, depth=0.0, jitter=0.0, noise=1.0,
                      topic_len=4.0, topic_experts=2, topic_boost=1.0)
    assert synthetic_logits(p, 10, layer=1).shape == (10, 8)
    with pytest.raises(ValueError, match="k <= n_experts"):
        TrafficPreset("bad", 4, 5, 2, 1.0, 0.0, 0.0, 1.0, 4.0, 1, 1.0)
    with pytest.raises(ValueError, match="topic_len"):
        TrafficPreset("bad", 8, 2, 2, 1.0, 0.0, 0.0, 1.0, 0.5, 1, 1.0)
    with pytest.raises(ValueError, match="unknown traffic preset"):
        synthetic_logits("gpt-oss-999b", 4)
    with pytest.raises(ValueError, match="layer=36"):
        synthetic_logits("gpt-oss-120b", 4, layer=36)
    with pytest.raises(ValueError, match="n_tokens=-1"):
        synthetic_logits("gpt-oss-120b", -1)
    with pytest.raises(TypeError, match="n_tokens"):
        synthetic_logits("gpt-oss-120b", 4.0)
    with pytest.raises(ValueError, match="seed=-2"):
        synthetic_logits("gpt-oss-120b", 4, seed=-2)
