"""``Einsum``: a linear map written as an einsum, the one projection every layer uses.

Writing projections as einsums with the shape letters of the legend in
``tfm/layers/attention.py`` (``"BTD,DNH->BTNH"``) makes the shape the
documentation and lets every kernel carry its logical axis names.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
from jax import Array

Initializer = nn.initializers.Initializer


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

    @nn.compact
    def __call__(self, equation: str, x: Array) -> Array:
        if len(self.shape) != len(self.axes):
            raise ValueError(f"kernel shape {self.shape} and logical axes {self.axes} differ in rank")
        init = self.kernel_init or default_kernel_init(self.in_axis, self.out_axis)
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes), self.shape, self.param_dtype)
        y = jnp.einsum(equation, x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            out = (self.out_axis,) if isinstance(self.out_axis, int) else tuple(self.out_axis)
            out = tuple(a % len(self.shape) for a in out)
            bias_shape = tuple(self.shape[a] for a in out)
            bias_axes = tuple(self.axes[a] for a in out)
            bias = self.param(
                "bias", nn.with_logical_partitioning(self.bias_init, bias_axes), bias_shape, self.param_dtype
            )
            y = y + bias.astype(self.dtype)
        return y
