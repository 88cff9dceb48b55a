"""``Einsum``: a linear map written as an einsum, the one projection every layer uses.

Writing projections as einsums with the shape letters of the legend in
``tfm/layers/attention.py`` (``"BTD,DNH->BTNH"``) makes the shape the
documentation and lets every kernel carry its logical axis names.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
from jax import Array

from tfm.layers import tuning

Initializer = nn.initializers.Initializer


def _matmul_plan(equation: str, x_ndim: int, k_ndim: int):
    """``(batch, contracted, free, kernel_transposed)`` letters if the einsum is a plain matmul, else None.

    A plain matmul: ``x = batch + contracted``, ``out = batch + free`` and the kernel
    is ``contracted + free`` (or ``free + contracted``, a transposed kernel such as a
    tied embedding table).
    """
    lhs, out = equation.replace(" ", "").split("->")
    xs, ks = lhs.split(",")
    if len(xs) != x_ndim or len(ks) != k_ndim:
        return None
    contracted = "".join(c for c in ks if c in xs and c not in out)
    free = "".join(c for c in ks if c not in xs)
    batch = xs[: len(xs) - len(contracted)]
    if not contracted or xs != batch + contracted or out != batch + free or any(c in ks for c in batch):
        return None
    if ks == contracted + free:
        return batch, contracted, free, False
    if ks == free + contracted:
        return batch, contracted, free, True
    return None


def einsum_matmul(equation: str, x: Array, kernel: Array, **kwargs: Any) -> Array:
    """``jnp.einsum(equation, x, kernel)``, run as one 2-D matmul where ``tuning.fold_to_matmul()`` says so."""
    plan = _matmul_plan(equation, x.ndim, kernel.ndim) if tuning.fold_to_matmul() else None
    if plan is None:
        return jnp.einsum(equation, x, kernel, **kwargs)
    batch, contracted, free, transposed = plan
    lead, nb = x.shape[: len(batch)], len(batch)
    free_shape = kernel.shape[: len(free)] if transposed else kernel.shape[len(contracted) :]
    k = math.prod(x.shape[nb:])
    kernel2 = kernel.reshape((-1, k) if transposed else (k, -1))
    y = jnp.einsum("MK,NK->MN" if transposed else "MK,KN->MN", x.reshape(-1, k), kernel2, **kwargs)
    return y.reshape(lead + tuple(free_shape))


def as_dtype(w: Array, dtype: jnp.dtype) -> Array:
    """``w.astype(dtype)``, or ``w`` itself when it has that dtype already (a quantized kernel stays as it is)."""
    return w if w.dtype == dtype else w.astype(dtype)


def fused_projection(x: Array, projections: Sequence[Einsum], dtype: jnp.dtype, split: bool = True
                     ) -> tuple[Array, ...] | Array:  # fmt: skip
    """``x [B, T, D]`` through several ``[D, heads, H]`` projections with one matmul.

    The kernels (and biases) are concatenated on their output axes, so the
    parameters stay those of the separate projections and the result is theirs:
    one ``[B, T, heads, H]`` per projection, or with ``split=False`` the product
    itself, ``[B, T, F]`` with the projections' outputs side by side.
    """
    d = x.shape[-1]
    kernels = [as_dtype(p.kernel, dtype) for p in projections]
    widths = [math.prod(w.shape[1:]) for w in kernels]
    y = einsum_matmul("BTD,DF->BTF", x.astype(dtype), jnp.concatenate([w.reshape(d, -1) for w in kernels], axis=1))
    if any(p.use_bias for p in projections):  # a projection without one adds zeros
        y = y + jnp.concatenate([p.bias.astype(dtype).reshape(-1) if p.use_bias else jnp.zeros((n,), dtype)
                                 for p, n in zip(projections, widths)])  # fmt: skip
    if not split:
        return y
    parts = jnp.split(y, list(itertools.accumulate(widths))[:-1], axis=-1)
    return tuple(part.reshape(x.shape[:-1] + w.shape[1:]) for part, w in zip(parts, kernels))


def default_kernel_init(in_axis: int | Sequence[int], out_axis: int | Sequence[int]) -> Initializer:
    """Glorot/Xavier uniform with fans computed over the given axes (the Transformer's usual init)."""
    return nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=in_axis, out_axis=out_axis)


class Einsum(nn.Module):
    """``y = einsum(equation, x, kernel) [+ bias]`` with logically partitioned parameters.

    ``in_axis``/``out_axis`` index the kernel's input and output axes (for the
    default init's fans). ``kernel_init=None`` means Glorot uniform over them.
    The bias, if any, has the kernel's output-axis shape.
    """

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    in_axis: int | tuple[int, ...] = 0
    out_axis: int | tuple[int, ...] = -1
    use_bias: bool = False
    kernel_init: Initializer | None = None
    bias_init: Initializer = nn.initializers.zeros_init()
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        if len(self.shape) != len(self.axes):
            raise ValueError(f"kernel shape {self.shape} and logical axes {self.axes} differ in rank")
        init = self.kernel_init or default_kernel_init(self.in_axis, self.out_axis)
        self.kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes), self.shape, self.param_dtype)
        if self.use_bias:
            out = (self.out_axis,) if isinstance(self.out_axis, int) else tuple(self.out_axis)
            out = tuple(a % len(self.shape) for a in out)
            bias_shape = tuple(self.shape[a] for a in out)
            bias_axes = tuple(self.axes[a] for a in out)
            init = nn.with_logical_partitioning(self.bias_init, bias_axes)
            self.bias = self.param("bias", init, bias_shape, self.param_dtype)

    def __call__(self, equation: str, x: Array) -> Array:
        y = einsum_matmul(equation, x.astype(self.dtype), as_dtype(self.kernel, self.dtype))
        if self.use_bias:
            y = y + self.bias.astype(self.dtype)
        return y
