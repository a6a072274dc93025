"""The slot pool: hits keep their slots, misses take LRU slots, nothing overlaps."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hybrid.moe.residency import SlotPool


def test_non_persistent_pool_packs_in_id_order():
    pool = SlotPool(8, persistent=False)
    slots, miss = pool.assign(0, np.array([2, 3, 7]))
    assert slots.tolist() == [0, 1, 2] and miss.all()
    slots, miss = pool.assign(0, np.array([2, 3, 7]))
    assert slots.tolist() == [0, 1, 2] and miss.all()  # nothing survives


def test_persistent_pool_hits_and_lru_eviction():
    pool = SlotPool(4)
    s, m = pool.assign(0, np.array([1, 2]))
    assert s.tolist() == [0, 1] and m.all()
    s, m = pool.assign(1, np.array([5, 6]))
    assert s.tolist() == [2, 3] and m.all()
    s, m = pool.assign(0, np.array([1, 9]))  # 1 is a hit; 9 evicts the LRU slot (layer 0 expert 2)
    assert s.tolist() == [0, 1] and m.tolist() == [False, True]
    assert pool.resident(0) == [1, 9] and pool.resident(1) == [5, 6]


def test_too_many_experts_is_an_error():
    with pytest.raises(ValueError, match="do not fit"):
        SlotPool(2).assign(0, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="at least one"):
        SlotPool(0)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 12), st.lists(st.tuples(st.integers(0, 2), st.sets(st.integers(0, 15), min_size=1)),
                                    min_size=1, max_size=20))
def test_property_pool_is_a_consistent_cache(n_slots, rounds):
    pool = SlotPool(n_slots)
    held = {}  # slot -> (layer, expert): our model of the device
    for layer, experts in rounds:
        experts = np.array(sorted(experts))[:n_slots]
        before = set(held.values())
        slots, miss = pool.assign(layer, experts)
        assert len(set(slots.tolist())) == experts.size and ((0 <= slots) & (slots < n_slots)).all()
        for e, s, m in zip(experts.tolist(), slots.tolist(), miss.tolist()):
            if not m:
                assert held[s] == (layer, e)  # a hit must really be resident
            else:
                assert (layer, e) not in before  # and a resident expert is never copied again
            held[s] = (layer, e)
        for s, key in held.items():  # the pool's view equals the model's
            assert key[1] in pool.resident(key[0])
