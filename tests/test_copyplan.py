"""hybrid.moe.copyplan: ranges, copy lists (natural/compact, padding, merging), plan_for."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hybrid.moe.copyplan import CopyPlan, CostModel, plan, plan_for, ranges


def _runs_py(used):
    """Maximal runs, the slow obvious way."""
    out = []
    for e in used:
        if out and out[-1][1] == e - 1:
            out[-1][1] = e
        else:
            out.append([e, e])
    return out


used_sets = st.integers(1, 150).flatmap(
    lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1), max_size=n)))


def _coverage(p: CopyPlan):
    """How many copies hold each expert's whole slab (a pad tail is not a slab)."""
    cov = np.zeros(p.n_experts, int)
    for a, b in zip(p.first, p.last):
        cov[a:b + 1] += 1
    return cov


def _check_common(p: CopyPlan, used, n, slab):
    used = np.asarray(used)
    assert p.src.dtype == p.dst.dtype == p.nbytes.dtype == np.int64
    assert p.first.dtype == p.last.dtype == p.slot.dtype == np.int32
    assert p.slot.shape == (n,)
    # inside both buffers
    assert np.all(p.src >= 0) and np.all(p.src + p.nbytes <= n * slab)
    assert np.all(p.dst >= 0) and np.all(p.dst + p.nbytes <= p.device_bytes)
    assert np.all(p.nbytes > 0)
    # copies read whole slabs from expert boundaries, plus PR #15346's pad if asked
    np.testing.assert_array_equal(p.src, p.first.astype(np.int64) * slab)
    pad = np.where(p.pad_tail & (p.last < n - 1), min(slab, 512), 0)
    np.testing.assert_array_equal(p.nbytes, (p.last - p.first + 1).astype(np.int64) * slab + pad)
    # every used expert's slab copied exactly once, and its slot points at it
    cov = _coverage(p)
    assert np.all(cov[used] == 1)
    assert np.all(cov <= 1)
    for e in used:
        i = np.searchsorted(p.last, e)
        assert p.first[i] <= e <= p.last[i]
        assert p.slot[e] * slab == p.dst[i] + (e - p.first[i]) * slab
    # copies never overlap on the device
    order = np.argsort(p.dst)
    assert np.all(p.dst[order][1:] >= (p.dst + p.nbytes)[order][:-1])
    assert p.n_copies == len(p.src) and p.total_bytes == int(p.nbytes.sum())


def test_ranges_by_hand():
    f, l = ranges(np.array([0, 1, 2, 5, 7, 8, 127], np.int32))
    np.testing.assert_array_equal(f, [0, 5, 7, 127])
    np.testing.assert_array_equal(l, [2, 5, 8, 127])
    f, l = ranges(np.array([], np.int64))
    assert f.shape == l.shape == (0,)


@settings(max_examples=80, deadline=None)
@given(used_sets)
def test_ranges_property(nu):
    n, s = nu
    used = np.array(sorted(s), np.int64)
    f, l = ranges(used)
    assert [[a, b] for a, b in zip(f.tolist(), l.tolist())] == _runs_py(used.tolist())


def test_natural_by_hand():
    p = plan(np.array([1, 2, 5, 7]), 100, 8)
    np.testing.assert_array_equal(p.src, [100, 500, 700])
    np.testing.assert_array_equal(p.dst, p.src)
    np.testing.assert_array_equal(p.nbytes, [200, 100, 100])
    np.testing.assert_array_equal(p.slot, [-1, 1, 2, -1, -1, 5, -1, 7])
    assert p.device_bytes == 800 and p.n_copies == 3 and p.total_bytes == 400


def test_pad_tail_by_hand():
    # PR #15346: min(slab, 512) past every run except one ending at expert E-1.
    p = plan(np.array([1, 2, 5, 7]), 1000, 8, pad_tail=True)
    np.testing.assert_array_equal(p.nbytes, [2512, 1512, 1000])
    p = plan(np.array([0, 3]), 100, 8, pad_tail=True)
    np.testing.assert_array_equal(p.nbytes, [200, 200])
    np.testing.assert_array_equal(p.slot, [0, -1, -1, 3, -1, -1, -1, -1])  # pads are not experts
    with pytest.raises(ValueError, match="pad_tail"):
        plan(np.array([0, 3]), 100, 8, layout="compact", pad_tail=True)


def test_compact_by_hand():
    p = plan(np.array([1, 2, 5, 7]), 100, 8, layout="compact")
    np.testing.assert_array_equal(p.src, [100, 500, 700])
    np.testing.assert_array_equal(p.dst, [0, 200, 300])
    np.testing.assert_array_equal(p.slot, [-1, 0, 1, -1, -1, 2, -1, 3])
    assert p.device_bytes == 400


def test_merge_by_hand():
    # latency * bandwidth = 250 bytes: gaps of 1 or 2 slabs of 100 merge, 3 does not.
    cm = CostModel(latency_s=1e-6, bandwidth_Bps=250e6)
    p = plan(np.array([0, 2, 5, 9]), 100, 10, layout="compact", cost=cm)
    np.testing.assert_array_equal(p.first, [0, 9])
    np.testing.assert_array_equal(p.last, [5, 9])
    np.testing.assert_array_equal(p.slot, [0, 1, 2, 3, 4, 5, -1, -1, -1, 6])
    assert p.device_bytes == 700
    plain = plan(np.array([0, 2, 5, 9]), 100, 10, layout="compact")
    assert p.cost(cm) < plain.cost(cm)
    assert cm.of(plain) == pytest.approx(4 * 1e-6 + 400 / 250e6)


@settings(max_examples=120, deadline=None)
@given(used_sets, st.integers(1, 5000), st.sampled_from(["natural", "compact"]), st.booleans())
def test_plan_properties(nu, slab, layout, pad):
    n, s = nu
    pad = pad and layout == "natural"
    used = np.array(sorted(s), np.int32)
    p = plan(used, slab, n, layout=layout, pad_tail=pad)
    _check_common(p, used, n, slab)
    runs = _runs_py(used.tolist())
    assert p.n_copies == len(runs)
    # without merging nothing unused is copied (beyond the pad bytes)
    assert np.all(_coverage(p)[np.setdiff1d(np.arange(n), used)] == 0)
    np.testing.assert_array_equal(p.slot >= 0, np.isin(np.arange(n), used))
    pads = sum(min(slab, 512) for _, b in runs if b < n - 1) if pad else 0
    assert p.total_bytes == len(used) * slab + pads
    if layout == "compact":
        np.testing.assert_array_equal(p.slot[used], np.arange(len(used)))
        assert p.device_bytes == len(used) * slab
    else:
        np.testing.assert_array_equal(p.slot[used], used)
        assert p.device_bytes == n * slab


@settings(max_examples=120, deadline=None)
@given(used_sets, st.integers(1, 5000), st.sampled_from(["natural", "compact"]), st.booleans(),
       st.floats(0, 1e-4), st.floats(1e6, 1e10))
def test_merge_properties(nu, slab, layout, pad, lat, bw):
    n, s = nu
    pad = pad and layout == "natural"
    used = np.array(sorted(s), np.int32)
    cm = CostModel(lat, bw)
    plain = plan(used, slab, n, layout=layout, pad_tail=pad)
    merged = plan(used, slab, n, layout=layout, pad_tail=pad, cost=cm)
    _check_common(merged, used, n, slab)
    assert merged.cost(cm) <= plain.cost(cm) * (1 + 1e-12)
    assert merged.n_copies <= plain.n_copies
    # each remaining break is a gap too costly to merge
    for a, b in zip(merged.last[:-1], merged.first[1:]):
        assert (b - a - 1) * slab / bw >= lat
    copied = np.concatenate([np.arange(a, b + 1) for a, b in zip(merged.first, merged.last)] or [[]])
    assert np.all(np.isin(used, copied))
    if layout == "compact":
        np.testing.assert_array_equal(merged.slot[copied.astype(int)], np.arange(len(copied)))
        assert merged.device_bytes == len(copied) * slab


@settings(max_examples=60, deadline=None)
@given(used_sets, st.integers(1, 5000), st.integers(1, 5000), st.sampled_from(["natural", "compact"]),
       st.booleans())
def test_plan_for_shares_ranges(nu, slab, slab2, layout, merge):
    n, s = nu
    used = np.array(sorted(s), np.int32)
    cm = CostModel(2e-6, 1e9) if merge else None
    p = plan(used, slab, n, layout=layout, cost=cm, pad_tail=layout == "natural")
    q = plan_for(p, slab2)
    np.testing.assert_array_equal(q.first, p.first)
    np.testing.assert_array_equal(q.last, p.last)
    np.testing.assert_array_equal(q.slot, p.slot)
    assert q.slab_bytes == slab2 and q.layout == p.layout and q.pad_tail == p.pad_tail
    _check_common(q, used, n, slab2)
    if not merge:  # without merges plan_for is just planning again with the new slab
        r = plan(used, slab2, n, layout=layout, pad_tail=layout == "natural")
        for a in ("src", "dst", "nbytes"):
            np.testing.assert_array_equal(getattr(q, a), getattr(r, a))
    assert p.for_slab(slab2).total_bytes == q.total_bytes


def test_all_used_is_one_copy_and_none_is_zero():
    p = plan(np.arange(128), 4_406_400, 128, pad_tail=True)
    assert p.n_copies == 1 and p.total_bytes == 128 * 4_406_400
    p = plan(np.array([], np.int32), 64, 8, layout="compact")
    assert p.n_copies == 0 and p.device_bytes == 0 and np.all(p.slot == -1)


def test_plan_rejects_bad_input():
    u = np.array([1, 3, 4])
    with pytest.raises(ValueError, match="sorted and unique"):
        plan(np.array([3, 1]), 8, 8)
    with pytest.raises(ValueError, match="sorted and unique"):
        plan(np.array([1, 1]), 8, 8)
    with pytest.raises(ValueError, match="outside"):
        plan(np.array([1, 8]), 8, 8)
    with pytest.raises(ValueError, match="outside"):
        plan(np.array([-1, 2]), 8, 8)
    with pytest.raises(TypeError, match="integer"):
        plan(u.astype(float), 8, 8)
    with pytest.raises(TypeError, match="numpy"):
        plan([1, 3], 8, 8)
    with pytest.raises(ValueError, match="1-D"):
        plan(u.reshape(1, 3), 8, 8)
    with pytest.raises(ValueError, match="slab_bytes=0"):
        plan(u, 0, 8)
    with pytest.raises(TypeError, match="slab_bytes"):
        plan(u, 8.0, 8)
    with pytest.raises(ValueError, match="layout"):
        plan(u, 8, 8, layout="packed")
    with pytest.raises(TypeError, match="CostModel"):
        plan(u, 8, 8, cost=(1e-6, 1e9))
    with pytest.raises(ValueError, match="bandwidth"):
        CostModel(1e-6, 0.0)
    with pytest.raises(ValueError, match="latency"):
        CostModel(float("nan"), 1e9)
    with pytest.raises(ValueError, match="sorted"):
        ranges(np.array([2, 2]))
    with pytest.raises(ValueError, match="int32"):
        ranges(np.array([1, 2**31]))  # would wrap to a negative id
    with pytest.raises(ValueError, match="int32"):
        plan(np.array([1]), 8, 2**31)
    with pytest.raises(ValueError, match="overflow"):
        plan(np.array([1]), 2**62, 8)
    with pytest.raises(TypeError, match="CopyPlan"):
        plan_for("plan", 8)


@settings(max_examples=60, deadline=None)
@given(used_sets, st.data())
def test_slot_runs_cover_each_placement_once(nu, data):
    from hybrid.moe.copyplan import slot_runs
    n, s = nu
    experts = np.array(sorted(s), np.int32)
    # slots: a permutation of a slot range, with some consecutive stretches
    slots = np.array(data.draw(st.permutations(range(len(experts) + 3)))[:len(experts)], np.int32)
    if data.draw(st.booleans()):
        slots = np.arange(len(experts), dtype=np.int32) + 2
    first, last, dst = slot_runs(experts, slots)
    got = {}
    for a, b, d in zip(first.tolist(), last.tolist(), dst.tolist()):
        for e in range(a, b + 1):
            assert e not in got
            got[e] = d + e - a
    assert got == dict(zip(experts.tolist(), slots.tolist()))
    # maximal: neighbouring copies could not have been one
    for i in range(len(first) - 1):
        assert not (first[i + 1] == last[i] + 1 and dst[i + 1] == dst[i] + last[i] - first[i] + 1)


def test_slot_runs_rejects_bad_input():
    from hybrid.moe.copyplan import slot_runs
    with pytest.raises(TypeError, match="integer"):
        slot_runs(np.array([1.5, 2.0]), np.array([0, 1]))
    with pytest.raises(ValueError, match="sorted"):
        slot_runs(np.array([2, 1]), np.array([0, 1]))
    with pytest.raises(ValueError, match="non-negative"):
        slot_runs(np.array([0, 1]), np.array([-1, 0]))
    with pytest.raises(ValueError, match="int32"):
        slot_runs(np.array([0, 2**40]), np.array([0, 1]))
    with pytest.raises(ValueError, match="one length"):
        slot_runs(np.array([0, 1]), np.array([0]))
