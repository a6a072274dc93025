"""The MoE operation as data: routing.route_spec against the float64 model of spec.py (reference.route_reference)."""
import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hybrid.moe.layer import MoELayer
from hybrid.moe.reference import moe_reference, route_reference
from hybrid.moe.routing import route, route_spec
from hybrid.moe.spec import GATINGS, MoESpec, from_gguf_gating, legacy
from hybrid.model.tiny import random_layer


@st.composite
def _case(draw):
    n_group = draw(st.sampled_from([0, 1, 2, 4]))
    per = draw(st.integers(2, 6)) if n_group > 1 else draw(st.integers(1, 24))
    E = per * max(n_group, 1)
    topk_group = draw(st.integers(1, n_group)) if n_group > 1 else 0
    room = topk_group * per if n_group > 1 else E
    k = draw(st.integers(1, room))
    spec = MoESpec(gating=draw(st.sampled_from(GATINGS)), norm=draw(st.booleans()),
                   scale=draw(st.sampled_from([1.0, 2.5, 0.125])), n_group=n_group, topk_group=topk_group,
                   activation=draw(st.sampled_from(["silu", "swiglu_oai"])))
    T = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31))
    biased = draw(st.booleans())
    return spec, T, E, k, seed, biased


@settings(max_examples=300, deadline=None)
@given(_case())
def test_route_spec_matches_float64_model(case):
    spec, T, E, k, seed, biased = case
    rng = np.random.default_rng(seed)
    z = (3 * rng.standard_normal((T, E))).astype(np.float32)
    b = (0.5 * rng.standard_normal(E)).astype(np.float32) if biased else None
    ids, w = route_spec(z, k, spec, b)
    rids, rw = route_reference(z, k, spec=spec, select_b=b)
    assert ids.dtype == np.int32 and w.dtype == np.float32 and ids.shape == w.shape == (T, k)
    assert all(len(set(r)) == k for r in ids.tolist())
    np.testing.assert_array_equal(ids, rids)
    np.testing.assert_allclose(w, rw, rtol=3e-6, atol=1e-7)
    if spec.norm or spec.gating == "softmax_chosen":  # sum to scale, or less where llama.cpp's clamp acts
        assert np.all(w.sum(1) <= spec.scale * (1 + 1e-5))
        full = route_reference(z, k, spec=spec, select_b=None)[1].sum(1)
        np.testing.assert_allclose(full, spec.scale, rtol=1e-6)


def test_groups_limit_the_choice():
    # 2 groups of 4: group 1 holds the single best expert, group 0 the better pair sum.
    z = np.array([[2.0, 2.0, -9, -9, 3.0, -9, -9, -9]], np.float32)
    spec = MoESpec(gating="sigmoid", n_group=2, topk_group=1)
    ids, _ = route_spec(z, 2, spec)
    np.testing.assert_array_equal(ids, [[0, 1]])
    np.testing.assert_array_equal(route_spec(z, 2, dataclasses.replace(spec, n_group=0, topk_group=0))[0], [[4, 0]])


def test_selection_bias_chooses_but_does_not_weigh():
    z = np.array([[1.0, 0.0, -1.0]], np.float32)
    b = np.array([0.0, 0.0, 5.0], np.float32)
    ids, w = route_spec(z, 1, MoESpec(gating="sigmoid"), b)
    assert ids[0, 0] == 2
    np.testing.assert_allclose(w[0, 0], 1 / (1 + np.exp(1.0)), rtol=1e-6)


def test_legacy_spelling_is_the_same_router():
    rng = np.random.default_rng(0)
    z = (3 * rng.standard_normal((50, 16))).astype(np.float32)
    for gating, renorm in (("softmax_topk", False), ("topk_softmax_all", False), ("topk_softmax_all", True)):
        a, b = route(z, 4, gating, renorm), route_spec(z, 4, legacy(gating, renorm))
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1].view(np.uint32), b[1].view(np.uint32))


@pytest.mark.parametrize("kw, match", [
    (dict(gating="softmax_topk"), "gating must be"), (dict(activation="gelu"), "activation"),
    (dict(shared="two"), "shared"), (dict(scale=0.0), "scale"), (dict(n_group=4, topk_group=5), "topk_group"),
    (dict(norm=1), "norm"),
])
def test_bad_specs(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MoESpec(**kw)


def test_groups_must_fit_the_layer():
    layer = random_layer(64, 64, 8, 2, seed=1)
    with pytest.raises(ValueError, match="not a multiple of the group count 3"):
        layer.with_spec(MoESpec(n_group=3, topk_group=1))
    with pytest.raises(ValueError, match="cannot hold"):
        layer.with_spec(MoESpec(n_group=4, topk_group=2), k=5)
    with pytest.raises(ValueError, match="gating function"):
        from_gguf_gating(7, "softmax")


def test_a_sigmoid_layer_runs_against_its_reference():
    from hybrid.moe.scheduler import HybridMoE
    layer = random_layer(64, 64, 8, 2, seed=2, gpt_oss=False)
    E = layer.n_experts
    sig = layer.with_spec(MoESpec(gating="sigmoid", norm=True, scale=2.0, n_group=2, topk_group=1,
                                  activation="silu"), select_b=np.linspace(-0.5, 0.5, E).astype(np.float32))
    assert isinstance(sig, MoELayer) and sig.gating == "sigmoid"
    x = np.random.default_rng(3).standard_normal((5, 64)).astype(np.float32)
    got = HybridMoE([sig], device="cpu").forward(0, x)
    np.testing.assert_allclose(got, moe_reference(sig, x), rtol=2e-4, atol=2e-4)
