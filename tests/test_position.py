"""Positional encodings: sinusoidal, learned, RoPE, T5 relative buckets/bias, ALiBi."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfm.layers import position as P
from tfm.layers.position import LearnedPositionEmbedding, RelativePositionBias, alibi_slopes

from _helpers import randn

# Jitted once per shape: one XLA compile instead of one per primitive (keeps the tests fast).
sinusoidal_positions = jax.jit(P.sinusoidal_positions, static_argnums=(1,))
apply_rope = jax.jit(P.apply_rope)
relative_position_bucket = jax.jit(
    P.relative_position_bucket, static_argnames=("bidirectional", "num_buckets", "max_distance")
)
rope_frequencies = P.rope_frequencies
alibi_bias = jax.jit(P.alibi_bias, static_argnums=(0,))


pytestmark = pytest.mark.usefixtures("cheap_xla_compiles")



# --- sinusoidal ----------------------------------------------------------------------


def test_sinusoidal_positions_matches_paper_formula():
    d = 16
    pe = np.asarray(P.sinusoidal_positions(50, d))
    assert pe.shape == (50, d)
    assert pe.dtype == np.float32
    for pos in (0, 1, 7, 23, 49):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert abs(pe[pos, 2 * i] - math.sin(angle)) <= 1e-5, (pos, i)
            assert abs(pe[pos, 2 * i + 1] - math.cos(angle)) <= 1e-5, (pos, i)
    # Literal values at position 0 and a hand-checked one: PE(1, 0) = sin(1).
    np.testing.assert_array_equal(pe[0, 0::2], np.zeros(d // 2, np.float32))
    np.testing.assert_array_equal(pe[0, 1::2], np.ones(d // 2, np.float32))
    assert abs(pe[1, 0] - 0.8414709848) <= 1e-6
    assert abs(pe[1, 1] - 0.5403023059) <= 1e-6


def test_sinusoidal_positions_from_array_and_errors():
    pos = jnp.array([[3, 0], [1, 2]])
    pe = np.asarray(sinusoidal_positions(pos, 8))
    assert pe.shape == (2, 2, 8)
    full = np.asarray(P.sinusoidal_positions(4, 8))
    np.testing.assert_array_equal(pe[0, 0], full[3])
    np.testing.assert_array_equal(pe[1, 1], full[2])
    with pytest.raises(ValueError):
        P.sinusoidal_positions(10, 7)


# --- learned ---------------------------------------------------------------------------


def test_learned_position_embedding_lookup():
    mod = LearnedPositionEmbedding(max_length=7, features=4)
    variables = jax.jit(mod.init)(jax.random.key(0), jnp.arange(3))
    table = np.asarray(nn.unbox(variables["params"])["embedding"])
    assert table.shape == (7, 4)
    positions = jnp.array([[6, 0, 2], [1, 1, 5]])
    out = np.asarray(jax.jit(mod.apply)(variables, positions))
    assert out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, table[np.asarray(positions)])


# --- RoPE -------------------------------------------------------------------------------


def _rope_reference(x, positions, base=10_000.0):
    """Rotate-half RoPE from RoFormer eq. 34 in NumPy float64: x [B,T,N,H], positions [T]."""
    x = np.asarray(x, np.float64)
    h = x.shape[-1]
    theta = base ** (-np.arange(0, h, 2) / h)  # [H/2]
    ang = np.asarray(positions, np.float64)[:, None] * theta  # [T, H/2]
    cos, sin = np.cos(ang)[None, :, None, :], np.sin(ang)[None, :, None, :]
    x1, x2 = x[..., : h // 2], x[..., h // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def test_rope_frequencies():
    f = np.asarray(rope_frequencies(8))
    np.testing.assert_allclose(f, [1.0, 10000**-0.25, 10000**-0.5, 10000**-0.75], rtol=1e-6)
    with pytest.raises(ValueError):
        rope_frequencies(5)


def test_apply_rope_matches_numpy_reference():
    x = randn(np.random.default_rng(0), 2, 5, 3, 8)
    pos = jnp.array([0, 1, 2, 7, 3])
    out = np.asarray(apply_rope(x, pos))
    assert out.dtype == np.float32
    assert np.max(np.abs(out - _rope_reference(x, np.asarray(pos)))) <= 1e-5
    # Position 0 is the identity, and rotations preserve the norm of every head vector.
    np.testing.assert_array_equal(out[:, 0], np.asarray(x)[:, 0])
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(np.asarray(x), axis=-1), rtol=1e-5)


def test_apply_rope_batched_positions_equal_shared_positions():
    x = randn(np.random.default_rng(1), 2, 4, 2, 6)
    pos = jnp.array([3, 4, 5, 6])
    shared = apply_rope(x, pos)
    batched = apply_rope(x, jnp.stack([pos, pos]))
    np.testing.assert_array_equal(np.asarray(shared), np.asarray(batched))
    # Different positions per batch row are honoured.
    mixed = np.asarray(apply_rope(x, jnp.stack([pos, pos + 2])))
    np.testing.assert_array_equal(mixed[0], np.asarray(shared)[0])
    assert np.max(np.abs(mixed[1] - np.asarray(apply_rope(x[1:], pos + 2))[0])) <= 1e-6
    assert np.max(np.abs(mixed[1] - np.asarray(shared)[1])) > 1e-2


def test_apply_rope_scores_depend_only_on_relative_offset():
    h = 16
    q = randn(np.random.default_rng(2), 1, 1, 1, h)
    k = randn(np.random.default_rng(3), 1, 1, 1, h)

    def score(m, n):
        rq = apply_rope(q, jnp.array([m]))
        rk = apply_rope(k, jnp.array([n]))
        return float(jnp.sum(rq * rk))

    for m, n in [(0, 0), (3, 1), (1, 5), (6, 6)]:
        base = score(m, n)
        for c in (1, 4, 11):
            assert abs(score(m + c, n + c) - base) <= 1e-4, (m, n, c)
    # ... and they do depend on the offset (the test above is not vacuous).
    assert abs(score(3, 1) - score(1, 3)) > 1e-3 or abs(score(3, 1) - score(0, 0)) > 1e-3


def test_apply_rope_bf16_keeps_dtype():
    x = randn(np.random.default_rng(4), 1, 3, 2, 4).astype(jnp.bfloat16)
    out = apply_rope(x, jnp.arange(3))
    assert out.dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(out, np.float32)).all()


# --- T5 relative position buckets ---------------------------------------------------------


def _t5_bucket_reference(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
    """HF transformers T5Attention._relative_position_bucket, for one Python int, float32 as torch does."""
    rp = int(relative_position)
    bucket = 0
    if bidirectional:
        num_buckets //= 2
        if rp > 0:
            bucket += num_buckets
        n = abs(rp)
    else:
        n = -min(rp, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return bucket + n
    f = np.float32
    large = max_exact + int(
        f(np.log(f(n) / f(max_exact))) / f(math.log(max_distance / max_exact)) * f(num_buckets - max_exact)
    )
    return bucket + min(large, num_buckets - 1)


BIDIRECTIONAL_LITERALS = {0: 0, -1: 1, -7: 7, -8: 8, -15: 9, -128: 15, -1000: 15, 1: 17, 8: 24, 128: 31}
CAUSAL_LITERALS = {0: 0, -1: 1, -15: 15, -16: 16, 1: 0, 5: 0, 300: 0, -128: 31, -5000: 31}


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_bucket_literals(bidirectional):
    literals = BIDIRECTIONAL_LITERALS if bidirectional else CAUSAL_LITERALS
    rp = jnp.array(list(literals))
    got = np.asarray(relative_position_bucket(rp, bidirectional=bidirectional, num_buckets=32, max_distance=128))
    np.testing.assert_array_equal(got, np.array(list(literals.values())))
    # The hand-computed literals agree with the reference formula too.
    for r, b in literals.items():
        assert _t5_bucket_reference(r, bidirectional) == b, r


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 64)])
def test_relative_position_bucket_matches_reference_over_range(bidirectional, num_buckets, max_distance):
    rp = np.arange(-300, 301)
    got = np.asarray(
        relative_position_bucket(
            jnp.asarray(rp), bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
        )
    )
    expected = np.array([_t5_bucket_reference(r, bidirectional, num_buckets, max_distance) for r in rp])
    np.testing.assert_array_equal(got, expected)
    assert got.min() >= 0 and got.max() <= num_buckets - 1
    # Monotone in the distance within each direction.
    past = got[rp <= 0][::-1]  # distance 0, 1, 2, ...
    assert (np.diff(past) >= 0).all()


def test_relative_position_bias_shape_and_values():
    n, t, s = 3, 4, 6
    mod = RelativePositionBias(num_heads=n, num_buckets=8, max_distance=16, bidirectional=True)
    variables = jax.jit(mod.init)(jax.random.key(0), jnp.arange(t), jnp.arange(s))
    table = np.asarray(nn.unbox(variables["params"])["embedding"])
    assert table.shape == (8, n)
    out = np.asarray(jax.jit(mod.apply)(variables, jnp.arange(t), jnp.arange(s)))
    assert out.shape == (1, n, t, s)
    for i in range(t):
        for j in range(s):
            b = _t5_bucket_reference(j - i, True, 8, 16)
            np.testing.assert_array_equal(out[0, :, i, j], table[b])
    # Batched positions give [B, N, T, S] and only relative offsets matter.
    qb = jnp.stack([jnp.arange(t), jnp.arange(t) + 10])
    kb = jnp.stack([jnp.arange(s), jnp.arange(s) + 10])
    outb = np.asarray(jax.jit(mod.apply)(variables, qb, kb))
    assert outb.shape == (2, n, t, s)
    np.testing.assert_array_equal(outb[0], out[0])
    np.testing.assert_array_equal(outb[1], out[0])


def test_relative_position_bias_causal_uses_causal_buckets():
    mod = RelativePositionBias(num_heads=2, num_buckets=8, max_distance=16, bidirectional=False)
    variables = jax.jit(mod.init)(jax.random.key(1), jnp.arange(3), jnp.arange(3))
    table = np.asarray(nn.unbox(variables["params"])["embedding"])
    out = np.asarray(jax.jit(mod.apply)(variables, jnp.arange(3), jnp.arange(3)))
    for i in range(3):
        for j in range(3):
            np.testing.assert_array_equal(out[0, :, i, j], table[_t5_bucket_reference(j - i, False, 8, 16)])


# --- ALiBi -------------------------------------------------------------------------------------


def test_alibi_slopes_power_of_two():
    np.testing.assert_array_equal(np.asarray(alibi_slopes(8)), np.array([2.0**-k for k in range(1, 9)], np.float32))
    expected4 = np.array([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8], np.float32)
    np.testing.assert_array_equal(np.asarray(alibi_slopes(4)), expected4)
    np.testing.assert_array_equal(np.asarray(alibi_slopes(1)), np.array([2.0**-8], np.float32))


def test_alibi_slopes_non_power_of_two():
    # 6 heads: the 4-head slopes, then every other slope of the 8-head sequence, first 2 of those.
    expected = [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]
    np.testing.assert_allclose(np.asarray(alibi_slopes(6)), np.array(expected, np.float32), rtol=1e-6, atol=0)
    # 12 heads: the 8-head slopes, then [2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5] from the 16-head sequence.
    expected12 = [2.0**-k for k in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
    np.testing.assert_allclose(np.asarray(alibi_slopes(12)), np.array(expected12, np.float32), rtol=1e-6, atol=0)
    with pytest.raises(ValueError):
        alibi_slopes(0)


def test_alibi_bias_values():
    n = 4
    q, k = jnp.arange(3), jnp.arange(5)
    b = np.asarray(alibi_bias(n, q, k))
    assert b.shape == (1, n, 3, 5)
    slopes = [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]
    for h in range(n):
        for i in range(3):
            for j in range(5):
                assert abs(b[0, h, i, j] - (-slopes[h] * abs(i - j))) <= 1e-7
    np.testing.assert_array_equal(b[0, 0, 2], [-0.5, -0.25, 0.0, -0.25, -0.5])
    # Causal region equals the paper's slope * (s - t).
    for i in range(3):
        for j in range(i + 1):
            assert b[0, 1, i, j] == np.float32(slopes[1] * (j - i))
