"""Literal tests of the boolean attention masks in tfm.layers.masks (True = may attend)."""

import jax.numpy as jnp
import numpy as np
import pytest

from tfm.layers.masks import (
    and_masks,
    block_sparse_mask,
    causal_mask,
    local_mask,
    or_masks,
    padding_mask,
    padding_mask_from_tokens,
    segment_mask,
)


def _np(m):
    m = np.asarray(m)
    assert m.dtype == np.bool_, m.dtype
    return m


def test_causal_mask_square():
    m = _np(causal_mask(5))
    assert m.shape == (1, 1, 5, 5)
    np.testing.assert_array_equal(m[0, 0], np.tril(np.ones((5, 5), bool)))


def test_causal_mask_with_longer_kv_offsets_queries_to_the_end():
    m = _np(causal_mask(3, kv_length=5))
    assert m.shape == (1, 1, 3, 5)
    expected = np.array(
        [
            [1, 1, 1, 0, 0],  # query at absolute position 2
            [1, 1, 1, 1, 0],  # 3
            [1, 1, 1, 1, 1],  # 4
        ],
        bool,
    )
    np.testing.assert_array_equal(m[0, 0], expected)


def test_causal_mask_single_query_sees_everything():
    np.testing.assert_array_equal(_np(causal_mask(1, kv_length=4))[0, 0], np.ones((1, 4), bool))


def test_causal_mask_rejects_kv_shorter_than_queries():
    with pytest.raises(ValueError):
        causal_mask(4, kv_length=3)


def test_padding_mask_literal():
    q_valid = jnp.array([[True, True, False], [True, False, False]])
    m = _np(padding_mask(q_valid))
    assert m.shape == (2, 1, 3, 3)
    e0 = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 0]], bool)
    e1 = np.array([[1, 0, 0], [0, 0, 0], [0, 0, 0]], bool)
    np.testing.assert_array_equal(m[0, 0], e0)
    np.testing.assert_array_equal(m[1, 0], e1)


def test_padding_mask_cross_literal():
    q_valid = jnp.array([[True, False]])
    kv_valid = jnp.array([[True, True, False]])
    m = _np(padding_mask(q_valid, kv_valid))
    assert m.shape == (1, 1, 2, 3)
    np.testing.assert_array_equal(m[0, 0], np.array([[1, 1, 0], [0, 0, 0]], bool))


def test_padding_mask_rejects_wrong_rank():
    with pytest.raises(ValueError):
        padding_mask(jnp.ones((2, 3, 1), bool))


def test_padding_mask_from_tokens_literal():
    q = jnp.array([[5, 7, 0, 0]])
    kv = jnp.array([[3, 0, 4]])
    m = _np(padding_mask_from_tokens(q, kv))
    assert m.shape == (1, 1, 4, 3)
    expected = np.array([[1, 0, 1], [1, 0, 1], [0, 0, 0], [0, 0, 0]], bool)
    np.testing.assert_array_equal(m[0, 0], expected)
    # Self version and a non-zero pad id.
    m2 = _np(padding_mask_from_tokens(jnp.array([[1, 2, 9]]), pad_id=9))
    np.testing.assert_array_equal(m2[0, 0], np.array([[1, 1, 0], [1, 1, 0], [0, 0, 0]], bool))


def test_segment_mask_keeps_packed_sequences_apart():
    seg = jnp.array([[1, 1, 2, 2, 2, 0]])
    m = _np(segment_mask(seg))
    assert m.shape == (1, 1, 6, 6)
    expected = np.array(
        [
            [1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 0],  # segment 0 = padding attends to nothing
        ],
        bool,
    )
    np.testing.assert_array_equal(m[0, 0], expected)
    # Combined with causality: packed causal LM.
    mc = _np(and_masks(m, causal_mask(6)))
    np.testing.assert_array_equal(mc[0, 0], expected & np.tril(np.ones((6, 6), bool)))


def test_segment_mask_cross_literal():
    m = _np(segment_mask(jnp.array([[1, 2]]), jnp.array([[2, 1, 1, 0]])))
    np.testing.assert_array_equal(m[0, 0], np.array([[0, 1, 1, 0], [1, 0, 0, 0]], bool))


def test_local_mask_causal_literal():
    m = _np(local_mask(5, 2))
    assert m.shape == (1, 1, 5, 5)
    expected = np.array(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 1, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 0, 1, 1],
        ],
        bool,
    )
    np.testing.assert_array_equal(m[0, 0], expected)


def test_local_mask_bidirectional_literal():
    m = _np(local_mask(5, 2, causal=False))
    expected = np.array(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [0, 1, 1, 1, 0],
            [0, 0, 1, 1, 1],
            [0, 0, 0, 1, 1],
        ],
        bool,
    )
    np.testing.assert_array_equal(m[0, 0], expected)


def test_local_mask_with_kv_length_and_window_one():
    m = _np(local_mask(2, 3, kv_length=5))
    # queries at absolute 3 and 4, window 3: keys 1..3 and 2..4
    np.testing.assert_array_equal(m[0, 0], np.array([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], bool))
    np.testing.assert_array_equal(_np(local_mask(4, 1))[0, 0], np.eye(4, dtype=bool))
    with pytest.raises(ValueError):
        local_mask(4, 0)


def test_local_mask_large_window_is_causal():
    np.testing.assert_array_equal(_np(local_mask(6, 6)), _np(causal_mask(6)))


def test_block_sparse_mask_literal_and_global_tokens():
    m = _np(block_sparse_mask(6, 2, num_local_blocks=0, global_tokens=0))
    expected_local = np.kron(np.eye(3, dtype=int), np.ones((2, 2), int)).astype(bool)
    np.testing.assert_array_equal(m[0, 0], expected_local)

    g = _np(block_sparse_mask(8, 2, num_local_blocks=0, global_tokens=1))[0, 0]
    assert g[0, :].all() and g[:, 0].all()
    expected = np.kron(np.eye(4, dtype=int), np.ones((2, 2), int)).astype(bool)
    expected[0, :] = True
    expected[:, 0] = True
    np.testing.assert_array_equal(g, expected)

    g2 = _np(block_sparse_mask(8, 2, num_local_blocks=1, global_tokens=2))[0, 0]
    assert g2[:2, :].all() and g2[:, :2].all()
    # block of query 7 is 3; it sees blocks 2 and 3 (keys 4..7) plus the globals.
    np.testing.assert_array_equal(g2[7], np.array([1, 1, 0, 0, 1, 1, 1, 1], bool))


def test_block_sparse_mask_causal():
    m = _np(block_sparse_mask(6, 2, num_local_blocks=1, global_tokens=1, causal=True))[0, 0]
    assert not np.triu(m, 1).any()
    expected = np.array(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 0, 1, 1, 1, 0],
            [1, 0, 1, 1, 1, 1],
        ],
        bool,
    )
    np.testing.assert_array_equal(m, expected)
    with pytest.raises(ValueError):
        block_sparse_mask(6, 0)


def test_and_or_masks_with_none():
    a = jnp.array([[[[True, False, True]]]])
    b = jnp.array([[[[True, True, False]]]])
    assert and_masks() is None
    assert or_masks() is None
    assert and_masks(None, None) is None
    assert or_masks(None) is None
    np.testing.assert_array_equal(_np(and_masks(a, None)), np.asarray(a))
    np.testing.assert_array_equal(_np(or_masks(None, b)), np.asarray(b))
    np.testing.assert_array_equal(_np(and_masks(a, b, None))[0, 0, 0], [True, False, False])
    np.testing.assert_array_equal(_np(or_masks(None, a, b))[0, 0, 0], [True, True, True])


def test_and_masks_broadcasts_padding_and_causal():
    pad = padding_mask_from_tokens(jnp.array([[4, 4, 0], [4, 0, 0]]))
    m = _np(and_masks(pad, causal_mask(3)))
    assert m.shape == (2, 1, 3, 3)
    np.testing.assert_array_equal(m[0, 0], np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0]], bool))
    np.testing.assert_array_equal(m[1, 0], np.array([[1, 0, 0], [0, 0, 0], [0, 0, 0]], bool))
