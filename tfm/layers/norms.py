"""LayerNorm (Ba et al. 2016) and RMSNorm (Zhang & Sennrich 2019), computed in float32.

Both compute their forward pass once, in ``_layer_norm_fwd``/``_rms_norm_fwd``.
Where ``tuning.hand_vjp()`` says so, they run through ``layer_norm``/``rms_norm``:
that forward, with the backward written out by hand instead of XLA's derivative
of the mean and variance. With x̂ the normalised input, s
the scale, r = 1/sqrt(var + eps) and g the output's cotangent (row means over
the last axis)::

    dx = r (g s - mean(g s) - x̂ mean(g s x̂))     (RMSNorm: no mean(g s) term)
    d scale = Σ_rows g x̂,   d bias = Σ_rows g

Two row reductions and one pass over the rows, where XLA's derivative of the
forward's reductions takes several passes more (see ``tuning``). Where
``tuning.cpu_rowwise()`` says so, a native kernel computes the same forward and
backward in one pass each (``tfm.layers.cpu_rowwise``); a pre-LN block also has
it add the residual sum's gradient there (``keep_input``).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import Array

from tfm import sharding as sh
from tfm.layers import cpu_rowwise, tuning


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: Array, scale: Array, bias: Array | None, epsilon: float) -> Array:
    """``(x - mean) / sqrt(var + eps) * scale [+ bias]`` over the last axis, float32, with a hand-written VJP."""
    return _layer_norm_fwd(x, scale, bias, epsilon)[0]


def _layer_norm_fwd(x, scale, bias, epsilon):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + epsilon)
    xhat = centred * rstd
    y = xhat * scale if bias is None else xhat * scale + bias
    return y, (xhat, rstd, scale, bias)


def _norm_bwd(centre: bool, residuals, g):
    xhat, rstd, scale, bias = residuals
    rows = tuple(range(g.ndim - 1))
    gs = g * scale
    inner = gs - xhat * jnp.mean(gs * xhat, axis=-1, keepdims=True)
    if centre:
        inner = inner - jnp.mean(gs, axis=-1, keepdims=True)
    dbias = None if bias is None else jnp.sum(g, axis=rows)
    return rstd * inner, jnp.sum(g * xhat, axis=rows), dbias


layer_norm.defvjp(_layer_norm_fwd, lambda epsilon, res, g: _norm_bwd(True, res, g))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: Array, scale: Array, epsilon: float) -> Array:
    """``x / sqrt(mean(x^2) + eps) * scale`` over the last axis, float32, with a hand-written VJP."""
    return _rms_norm_fwd(x, scale, epsilon)[0]


def _rms_norm_fwd(x, scale, epsilon):
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + epsilon)
    xhat = x * rstd
    return xhat * scale, (xhat, rstd, scale, None)


rms_norm.defvjp(_rms_norm_fwd, lambda epsilon, res, g: _norm_bwd(False, res, g)[:2])


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * scale + bias over the last axis (biased variance, like torch)."""

    epsilon: float = 1e-5
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, keep_input: bool = False) -> Array | tuple[Array, Array]:
        """The normalised ``x``; with ``keep_input``, ``(x, normalised x)``.

        ``keep_input`` serves a pre-LN block, which adds its sub-layer's output to the ``x`` returned:
        with the native kernel (float32) the gradient of that sum is added to the norm's input gradient
        in the norm's own backward pass (``cpu_rowwise.layer_norm``), instead of by a pass of XLA's.
        """
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (sh.NORM,)), (d,), self.param_dtype)
        xf = x.astype(jnp.float32)
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (sh.NORM,)), (d,), self.param_dtype)
            bias = bias.astype(jnp.float32)
        if cpu_rowwise.enabled():
            if keep_input and x.dtype == jnp.float32:
                x, y = cpu_rowwise.layer_norm(xf, scale.astype(jnp.float32), bias, self.epsilon, keep_input=True)
                return x, y.astype(self.dtype)
            norm = cpu_rowwise.layer_norm
        else:
            norm = layer_norm if tuning.hand_vjp() else lambda *a: _layer_norm_fwd(*a)[0]  # XLA's derivative
        y = norm(xf, scale.astype(jnp.float32), bias, self.epsilon).astype(self.dtype)
        return (x, y) if keep_input else y


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * scale — T5's LayerNorm: no mean subtraction, no bias."""

    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, keep_input: bool = False) -> Array | tuple[Array, Array]:
        """The normalised ``x``; with ``keep_input``, ``(x, normalised x)`` (as ``LayerNorm``)."""
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (sh.NORM,)), (d,), self.param_dtype)
        xf = x.astype(jnp.float32)
        if cpu_rowwise.enabled():
            if keep_input and x.dtype == jnp.float32:
                x, y = cpu_rowwise.rms_norm(xf, scale.astype(jnp.float32), self.epsilon, keep_input=True)
                return x, y.astype(self.dtype)
            norm = cpu_rowwise.rms_norm
        else:
            norm = rms_norm if tuning.hand_vjp() else lambda *a: _rms_norm_fwd(*a)[0]  # XLA's derivative
        y = norm(xf, scale.astype(jnp.float32), self.epsilon).astype(self.dtype)
        return (x, y) if keep_input else y


NORMS = ("layernorm", "rmsnorm")


def make_norm(
    kind: str,
    epsilon: float,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    name: str | None = None,
) -> nn.Module:
    """Build a ``LayerNorm`` or ``RMSNorm`` by name."""
    if kind == "layernorm":
        return LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name)
    if kind == "rmsnorm":
        return RMSNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name)
    raise ValueError(f"unknown norm {kind!r}; choose from {NORMS}")
