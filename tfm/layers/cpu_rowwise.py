"""LayerNorm, RMSNorm and the exact GELU on the CPU: native kernels through XLA's FFI, one pass each.

XLA's CPU backend runs a LayerNorm as a chain of loops (the mean, the centred input, the
variance, the output; in the backward two row reductions, two column sums and the input
gradient), and it evaluates ``erf`` slowly. ``kernels/rowwise_cpu.cc`` does each of those in
one pass over the rows, on XLA's intra-op threads: the forward keeps each row's mean and
1/sqrt(var + eps), and the backward recomputes the normalised input from them. The formulas
are those of ``tfm.layers.norms`` (its module docstring) and ``tfm.layers.feedforward.gelu``;
the results agree with them to float32 rounding (the sums run in another order, and erf is
a rational approximation, |error| < 4e-7).

Built, cached and registered with tfm's other CPU kernels (``tfm.layers.cpu_kernels``);
``tuning.CPU_ROWWISE`` picks them (default: the CPU backend with one device), float32 only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from tfm.layers import tuning
from tfm.layers.cpu_kernels import available

_NORM_FORWARD, _NORM_BACKWARD = "tfm_norm_cpu_forward", "tfm_norm_cpu_backward"
_GELU_FORWARD, _GELU_BACKWARD = "tfm_gelu_cpu_forward", "tfm_gelu_cpu_backward"


def enabled() -> bool:
    """Whether the layers take these kernels: ``tuning.cpu_rowwise()`` says so and they build."""
    return tuning.cpu_rowwise() and available()


def _f32(x: Array) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, jnp.float32)


def _norm_forward_call(x, scale, bias, epsilon, centre):
    stats = jax.ShapeDtypeStruct(x.shape[:-1], jnp.float32)
    call = jax.ffi.ffi_call(_NORM_FORWARD, (_f32(x), stats, stats), vmap_method="sequential")
    return call(x, scale, scale if bias is None else bias, eps=np.float32(epsilon), centre=centre,
                has_bias=bias is not None)  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _norm(x, scale, bias, epsilon, centre):
    return _norm_forward_call(x, scale, bias, epsilon, centre)[0]


def _norm_fwd(x, scale, bias, epsilon, centre):
    y, mean, rstd = _norm_forward_call(x, scale, bias, epsilon, centre)
    return y, (x, scale, bias, mean, rstd)


def _norm_backward_call(residuals, g, centre, g_input=None):
    """dx (plus ``g_input``: the gradient of the input where it is also passed on unchanged), d scale, d bias."""
    x, scale, bias, mean, rstd = residuals
    call = jax.ffi.ffi_call(_NORM_BACKWARD, (_f32(x), _f32(scale), _f32(scale)), vmap_method="sequential")
    g = g.astype(jnp.float32)
    extra = g if g_input is None else g_input.astype(jnp.float32)  # unread without has_residual
    dx, dscale, dbias = call(x, scale, mean, rstd, g, extra, centre=centre, has_residual=g_input is not None)
    return dx, dscale, None if bias is None else dbias


def _norm_bwd(epsilon, centre, residuals, g):
    return _norm_backward_call(residuals, g, centre)


_norm.defvjp(_norm_fwd, _norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _norm_keeping_input(x, scale, bias, epsilon, centre):
    return x, _norm_forward_call(x, scale, bias, epsilon, centre)[0]


def _norm_keeping_input_fwd(x, scale, bias, epsilon, centre):
    y, mean, rstd = _norm_forward_call(x, scale, bias, epsilon, centre)
    return (x, y), (x, scale, bias, mean, rstd)


def _norm_keeping_input_bwd(epsilon, centre, residuals, gs):
    g_input, g = gs
    return _norm_backward_call(residuals, g, centre, g_input)


_norm_keeping_input.defvjp(_norm_keeping_input_fwd, _norm_keeping_input_bwd)


def _check(name: str, x: Array, *params: Array | None) -> None:
    if not available():
        raise RuntimeError(f"cpu_rowwise.{name}: the native kernels could not be built (see the log)")
    for p in (x, *params):
        if p is not None and p.dtype != jnp.float32:
            raise ValueError(f"cpu_rowwise.{name}: float32 inputs only; got {p.dtype}")
    for p in params:
        if p is not None and p.shape != x.shape[-1:]:
            raise ValueError(f"cpu_rowwise.{name}: a parameter of shape {p.shape} for inputs {x.shape}; "
                             f"expected {x.shape[-1:]}")  # fmt: skip


def layer_norm(x: Array, scale: Array, bias: Array | None, epsilon: float, keep_input: bool = False
               ) -> Array | tuple[Array, Array]:  # fmt: skip
    """``norms.layer_norm`` by the native kernel: float32 ``x [..., D]``, ``scale``/``bias [D]`` (bias may be None).

    ``keep_input=True`` returns ``(x, y)``: the input passed on (a pre-LN block's residual sum takes it),
    whose gradient the backward adds to dx in the same pass instead of XLA adding the two afterwards.
    """
    _check("layer_norm", x, scale, bias)
    return (_norm_keeping_input if keep_input else _norm)(x, scale, bias, float(epsilon), True)


def rms_norm(x: Array, scale: Array, epsilon: float, keep_input: bool = False) -> Array | tuple[Array, Array]:
    """``norms.rms_norm`` by the native kernel: float32 ``x [..., D]``, ``scale [D]``; ``keep_input`` as above."""
    _check("rms_norm", x, scale)
    return (_norm_keeping_input if keep_input else _norm)(x, scale, None, float(epsilon), False)


@jax.custom_vjp
def _gelu(x):
    return jax.ffi.ffi_call(_GELU_FORWARD, _f32(x), vmap_method="sequential")(x)


def _gelu_bwd(x, g):
    return (jax.ffi.ffi_call(_GELU_BACKWARD, _f32(x), vmap_method="sequential")(x, g.astype(jnp.float32)),)


_gelu.defvjp(lambda x: (_gelu(x), x), _gelu_bwd)


def gelu(x: Array) -> Array:
    """``feedforward.gelu`` (exact, x Phi(x)) by the native kernel, float32; its gradient recomputes Phi from x."""
    _check("gelu", x)
    return _gelu(x)


__all__ = ["available", "enabled", "gelu", "layer_norm", "rms_norm"]
