"""hybrid.moe.routing against the float64 reference and bucket's layout invariants."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from hybrid.moe.reference import route_reference
from hybrid.moe.routing import Buckets, bucket, route


def _logits(rng, t, e, scale=3.0):
    return (scale * rng.standard_normal((t, e))).astype(np.float32)


@pytest.mark.parametrize("gating,renorm", [("softmax_topk", False), ("topk_softmax_all", False),
                                           ("topk_softmax_all", True)])
@pytest.mark.parametrize("t,e,k", [(1, 4, 1), (37, 32, 4), (200, 128, 4), (50, 8, 8), (64, 60, 6)])
def test_route_matches_reference(gating, renorm, t, e, k):
    rng = np.random.default_rng(t * 1000 + e + k)
    z = _logits(rng, t, e)
    ids, w = route(z, k, gating, renorm)
    rids, rw = route_reference(z, k, gating, renorm)
    assert ids.dtype == np.int32 and w.dtype == np.float32
    assert ids.shape == w.shape == (t, k)
    np.testing.assert_array_equal(ids, rids)
    np.testing.assert_allclose(w, rw, rtol=2e-6, atol=1e-7)
    if gating == "softmax_topk" or renorm:
        np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-5)


def test_route_ties_go_to_lower_id():
    rng = np.random.default_rng(1)
    # Few distinct values: most comparisons are ties.
    z = rng.integers(-2, 3, size=(300, 16)).astype(np.float32)
    z[0] = 1.0  # an all-equal row: experts 0..k-1
    z[1, :] = 0.0
    z[1, [3, 9, 12]] = 5.0
    ids, w = route(z, 5)
    np.testing.assert_array_equal(ids, route_reference(z, 5)[0])
    np.testing.assert_array_equal(ids[0], [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(ids[1], [3, 9, 12, 0, 1])
    np.testing.assert_allclose(w[0], 0.2, rtol=1e-6)
    # -0.0 and 0.0 are equal logits: still id order.
    z2 = np.array([[0.0, -0.0, 0.0, -1.0]], np.float32)
    np.testing.assert_array_equal(route(z2, 3)[0], [[0, 1, 2]])


def test_route_descending_and_distinct():
    rng = np.random.default_rng(2)
    z = _logits(rng, 500, 128)
    ids, _ = route(z, 4)
    sel = np.take_along_axis(z, ids, 1)
    assert np.all(np.diff(sel, axis=1) <= 0)
    assert all(len(set(r)) == 4 for r in ids.tolist())


def test_route_empty_and_noncontiguous():
    ids, w = route(np.zeros((0, 8), np.float32), 2)
    assert ids.shape == w.shape == (0, 2)
    rng = np.random.default_rng(3)
    z = _logits(rng, 40, 24)
    zt = np.asfortranarray(z)
    np.testing.assert_array_equal(route(zt, 3)[0], route(z, 3)[0])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_route_rejects_nonfinite(bad):
    z = np.random.default_rng(4).standard_normal((10, 8)).astype(np.float32)
    z[7, 3] = bad
    with pytest.raises(ValueError, match=r"finite.*\[7, 3\]"):
        route(z, 2)


def test_route_rejects_bad_input():
    z = np.ones((4, 8), np.float32)
    with pytest.raises(TypeError, match="float32"):
        route(z.astype(np.float64), 2)
    with pytest.raises(TypeError, match="numpy"):
        route(z.tolist(), 2)
    with pytest.raises(ValueError, match="shape"):
        route(z.reshape(-1), 2)
    with pytest.raises(ValueError, match="k=9"):
        route(z, 9)
    with pytest.raises(ValueError, match="k=0"):
        route(z, 0)
    with pytest.raises(TypeError, match="k must be an int"):
        route(z, 2.0)
    with pytest.raises(ValueError, match="gating"):
        route(z, 2, "softmax")
    with pytest.raises(ValueError, match="no experts"):
        route(np.ones((4, 0), np.float32), 1)


# --------------------------------------------------------------------------- bucket

def _check_layout(b: Buckets, ids):
    n_tok, k = ids.shape
    E, bs = b.n_experts, b.block_size
    flat = ids.reshape(-1)
    sentinel = n_tok * k
    assert b.sentinel == sentinel
    np.testing.assert_array_equal(b.used, np.unique(flat).astype(np.int32))
    np.testing.assert_array_equal(b.used_mask, np.bincount(flat, minlength=E) > 0)
    np.testing.assert_array_equal(b.counts, np.bincount(flat, minlength=E))
    # bitset agrees with the mask
    bits = np.unpackbits(b.used_bits.view(np.uint8), bitorder="little")[:E].astype(bool)
    np.testing.assert_array_equal(bits, b.used_mask)
    assert b.used_bits.dtype == np.uint64 and b.used_bits.shape == ((E + 63) // 64,)
    # offsets: start 0, multiples of bs, each bucket = counts rounded up
    assert b.offsets[0] == 0 and b.offsets.shape == (E + 1,)
    assert np.all(b.offsets % bs == 0)
    sizes = np.diff(b.offsets)
    np.testing.assert_array_equal(sizes, -(-b.counts // bs) * bs)
    assert b.pairs.shape == (b.offsets[-1],)
    # every real pair exactly once, in its expert's bucket, ascending; padding only sentinels
    real = b.pairs[b.pairs != sentinel]
    np.testing.assert_array_equal(np.sort(real), np.arange(n_tok * k))
    for e in range(E):
        seg = b.pairs[b.offsets[e]:b.offsets[e + 1]]
        got = seg[:b.counts[e]]
        assert np.all(flat[got] == e)
        assert np.all(np.diff(got) > 0)
        assert np.all(seg[b.counts[e]:] == sentinel)
        np.testing.assert_array_equal(b.expert_pairs(e), got)
    # tiles: each tile lies within one expert's bucket
    assert b.tile_expert.shape == (b.pairs.shape[0] // bs,)
    tile_start = np.arange(b.n_tiles) * bs
    owner = np.searchsorted(b.offsets, tile_start, side="right") - 1
    np.testing.assert_array_equal(b.tile_expert, owner)
    for arr in (b.used, b.counts, b.offsets, b.pairs, b.tile_expert):
        assert arr.dtype == np.int32


def test_bucket_small_by_hand():
    ids = np.array([[2, 0], [2, 3], [0, 2]], np.int32)
    b = bucket(ids, 5, block_size=2)
    np.testing.assert_array_equal(b.used, [0, 2, 3])
    np.testing.assert_array_equal(b.counts, [2, 0, 3, 1, 0])
    np.testing.assert_array_equal(b.offsets, [0, 2, 2, 6, 8, 8])
    np.testing.assert_array_equal(b.pairs, [1, 4, 0, 2, 5, 6, 3, 6])
    np.testing.assert_array_equal(b.tile_expert, [0, 2, 2, 3])
    assert b.used_bits[0] == 0b1101
    _check_layout(b, ids)


@pytest.mark.parametrize("bs", [1, 4, 16])
def test_bucket_from_route(bs):
    rng = np.random.default_rng(bs)
    z = _logits(rng, 300, 70)
    z[:, 5] += 4.0  # one hot expert
    ids, _ = route(z, 4)
    b = bucket(ids, 70, bs)
    _check_layout(b, ids)
    assert b.n_used == len(np.unique(ids))
    assert b.used_bits.shape == (2,)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n_tok=st.integers(0, 40), k=st.integers(1, 5),
       n_exp=st.integers(1, 140), bs=st.integers(1, 9))
def test_bucket_properties(data, n_tok, k, n_exp, bs):
    ids = data.draw(hnp.arrays(np.int64, (n_tok, k), elements=st.integers(0, n_exp - 1)))
    b = bucket(ids, n_exp, bs)
    _check_layout(b, ids)


def test_bucket_rejects_bad_input():
    ids = np.array([[0, 1], [2, 3]], np.int32)
    with pytest.raises(ValueError, match=r"expert id 4 outside"):
        bucket(ids + 1, 4)
    with pytest.raises(ValueError, match=r"expert id -1"):
        bucket(ids - 1, 4)
    with pytest.raises(ValueError, match=r"expert id 4294967299"):
        bucket(ids.astype(np.int64) + 2**32, 4)  # would wrap to a valid id as int32
    with pytest.raises(TypeError, match="integer"):
        bucket(ids.astype(np.float32), 4)
    with pytest.raises(TypeError, match="integer"):
        bucket(ids.astype(bool), 4)
    with pytest.raises(ValueError, match="shape"):
        bucket(ids.reshape(-1), 4)
    with pytest.raises(ValueError, match="block_size=0"):
        bucket(ids, 4, 0)
    with pytest.raises(TypeError, match="block_size"):
        bucket(ids, 4, 2.0)
    with pytest.raises(ValueError, match="n_experts=0"):
        bucket(ids, 0)
    with pytest.raises(TypeError, match="numpy"):
        bucket([[0, 1]], 4)
