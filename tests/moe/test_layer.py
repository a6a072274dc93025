"""MoELayer refuses weights whose shapes, types or settings do not fit together."""
import dataclasses

import numpy as np
import pytest

from hybrid.model.tiny import random_layer


@pytest.fixture(scope="module")
def layer():
    return random_layer(64, 96, 6, 2, seed=1)


@pytest.mark.parametrize("change, err, match", [
    (dict(k=0), ValueError, "k=0"),
    (dict(k=7), ValueError, "k=7"),
    (dict(k=2.0), TypeError, "k must be an int"),
    (dict(gating="sigmoid"), ValueError, "gating"),
    (dict(activation="gelu"), ValueError, "activation"),
    (dict(router_b=np.zeros(5, np.float32)), ValueError, "router_b"),
    (dict(gate_b=np.zeros((6, 96), np.float64)), TypeError, "gate_b"),
])
def test_bad_settings_are_rejected(layer, change, err, match):
    with pytest.raises(err, match=match):
        dataclasses.replace(layer, **change)


def test_mismatched_experts_are_rejected(layer):
    with pytest.raises(ValueError, match="down experts"):
        dataclasses.replace(layer, down=layer.gate)  # [E, n_ff, n_embd] where [E, n_embd, n_ff] is due
    other = random_layer(64, 96, 6, 2, seed=2)
    with pytest.raises(ValueError, match="expected"):
        dataclasses.replace(layer, router_w=other.router_w[:5])


def test_expert_tensor_checks_its_bytes(layer):
    t = layer.gate
    with pytest.raises(ValueError, match="do not match"):
        dataclasses.replace(t, cols=t.cols + 32)
    assert t.slab_bytes == t.raw[0].nbytes
    np.testing.assert_array_equal(t.dequantize(1).shape, (t.rows, t.cols))
