"""Helpers shared by the layer tests."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest


def torch_or_skip():
    return pytest.importorskip("torch")


def randn(rng, *shape, scale=1.0, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape) * scale, dtype)


def maxerr(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def param_shapes(module, *args, **kwargs):
    """Unboxed ShapeDtypeStructs of module.init's variables (no compilation)."""
    return nn.unbox(jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.key(0), *args))


def random_params(module, *args, seed=0, scale=0.3, **kwargs):
    """Random N(0, scale^2) values in the shapes of module's parameters (no jax.random compile)."""
    rng = np.random.default_rng(seed)
    shapes = param_shapes(module, *args, **kwargs)["params"]
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * scale, s.dtype), shapes)


def assert_same_tree(params, shapes):
    assert jax.tree.structure(params) == jax.tree.structure(shapes)
    for a, s in zip(jax.tree.leaves(params), jax.tree.leaves(shapes)):
        assert a.shape == s.shape, (a.shape, s.shape)
