"""hybrid.kernels.cuda.ops on the simulator against ops.py and float64 references."""
import numpy as np
import pytest
from numba import cuda

from hybrid.kernels.cuda import ops as dops
from hybrid.model import ops
from devices import DEVICE_TESTS

pytestmark = DEVICE_TESTS


def _rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _rmsnorm64(x, w, eps):
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


@pytest.mark.parametrize("shape", [(5, 96), (3, 4, 32), (1, 40)])  # 40: lanes get unequal shares
def test_rmsnorm(shape):
    rng = np.random.default_rng()
    x = _rand(rng, *shape, scale=float(rng.uniform(0.01, 100.0)))
    w = _rand(rng, shape[-1])
    eps = 1e-5
    got = dops.rmsnorm(cuda.to_device(x), cuda.to_device(w), eps).copy_to_host()
    assert got.shape == x.shape and got.dtype == np.float32
    ref = _rmsnorm64(x, w, eps)
    assert np.abs(got - ref).max() <= 1e-6 * np.abs(ref).max()
    np.testing.assert_allclose(got, ops.rmsnorm(x, w, eps), rtol=1e-5, atol=1e-6 * np.abs(ref).max())


def test_rmsnorm_in_place_and_eps_dominating():
    rng = np.random.default_rng()
    x = _rand(rng, 6, 64, scale=1e-4)
    w = _rand(rng, 64)
    xd = cuda.to_device(x)
    assert dops.rmsnorm(xd, cuda.to_device(w), 1.0, out=xd) is xd
    ref = _rmsnorm64(x, w, 1.0)
    assert np.abs(xd.copy_to_host() - ref).max() <= 1e-6 * np.abs(ref).max()


def test_rope_neox_part_of_the_head():
    rng = np.random.default_rng()
    T_, H, d, n_rot = 3, 2, 32, 16
    x = _rand(rng, T_, H, d)
    theta = rng.uniform(-10, 10, (T_, n_rot // 2))
    cos, sin = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
    xd = cuda.to_device(x)
    assert dops.rope_neox(xd, cuda.to_device(cos), cuda.to_device(sin)) is xd
    got = xd.copy_to_host()
    x64, half = x.astype(np.float64), n_rot // 2
    ref = x64.copy()
    c, s = cos[:, None, :].astype(np.float64), sin[:, None, :].astype(np.float64)
    ref[..., :half] = x64[..., :half] * c - x64[..., half:n_rot] * s
    ref[..., half:n_rot] = x64[..., :half] * s + x64[..., half:n_rot] * c
    assert np.abs(got - ref).max() <= 1e-6 * np.abs(ref).max()
    np.testing.assert_allclose(got, ops.rope_neox(x, cos, sin), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[..., n_rot:], x[..., n_rot:])  # dims past n_rot untouched


def test_rope_with_the_models_cos_sin():
    # cos/sin as the forward pass makes them (YaRN on), the whole head rotated.
    from types import SimpleNamespace
    cfg = SimpleNamespace(rope_base=lambda il: 150000.0, n_rot=16, freq_scale=1 / 32, attn_factor=1.0,
                          ext_factor=1.0, rope_corr_dims=lambda base: (2.0, 6.0))
    cos, sin = ops.rope_cos_sin(cfg, 0, np.arange(5, 9))
    rng = np.random.default_rng()
    x = _rand(rng, 4, 3, 16)
    got = dops.rope_neox(cuda.to_device(x), cuda.to_device(cos), cuda.to_device(sin)).copy_to_host()
    np.testing.assert_allclose(got, ops.rope_neox(x, cos, sin), rtol=1e-5, atol=1e-5)


def test_add_same_shape_and_bias():
    rng = np.random.default_rng()
    x, y, b = _rand(rng, 3, 4, 8), _rand(rng, 3, 4, 8), _rand(rng, 8)
    xd = cuda.to_device(x)
    assert dops.add(xd, cuda.to_device(y)) is xd
    np.testing.assert_array_equal(xd.copy_to_host(), x + y)
    dops.add(xd, cuda.to_device(b))
    np.testing.assert_array_equal(xd.copy_to_host(), x + y + b)


def test_to_device_f32():
    a = np.arange(12, dtype=np.float64).reshape(3, 4)[:, ::2]
    d = dops.to_device_f32(a)
    assert d.dtype == np.float32 and d.is_c_contiguous()
    np.testing.assert_array_equal(d.copy_to_host(), a.astype(np.float32))
    with pytest.raises(TypeError, match="numpy"):
        dops.to_device_f32([1.0, 2.0])


def test_bad_inputs():
    f = lambda *s: cuda.to_device(np.ones(s, np.float32))  # noqa: E731
    with pytest.raises(TypeError, match="device array"):
        dops.rmsnorm(np.ones((2, 8), np.float32), f(8), 1e-5)
    with pytest.raises(TypeError, match="float32"):
        dops.rmsnorm(cuda.to_device(np.ones((2, 8))), f(8), 1e-5)
    with pytest.raises(ValueError, match="dimensions"):
        dops.rmsnorm(f(8), f(8), 1e-5)
    with pytest.raises(ValueError, match=r"w has shape \(4,\)"):
        dops.rmsnorm(f(2, 8), f(4), 1e-5)
    with pytest.raises(ValueError, match="out has shape"):
        dops.rmsnorm(f(2, 8), f(8), 1e-5, out=f(8, 2))
    with pytest.raises(ValueError, match="eps"):
        dops.rmsnorm(f(2, 8), f(8), float("nan"))
    with pytest.raises(ValueError, match="C-contiguous"):
        dops.rmsnorm(f(2, 16)[:, ::2], f(8), 1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        dops.rope_neox(f(2, 1, 8), f(2, 5), f(2, 5))  # n_rot 10 > head_dim 8
    with pytest.raises(ValueError, match="do not fit"):
        dops.rope_neox(f(2, 1, 8), f(3, 2), f(3, 2))
    with pytest.raises(ValueError, match="sin has shape"):
        dops.rope_neox(f(2, 1, 8), f(2, 2), f(2, 3))
    with pytest.raises(ValueError, match="dimensions"):
        dops.rope_neox(f(2, 8), f(2, 2), f(2, 2))
    with pytest.raises(ValueError, match="must have x's shape"):
        dops.add(f(2, 8), f(4))
    with pytest.raises(ValueError, match="must have x's shape"):
        dops.add(f(2, 8), f(8, 2))
    with pytest.raises(TypeError, match="float32"):
        dops.add(f(2, 8), cuda.to_device(np.ones(8, np.int32)))
