"""Convolutions run as one matmul over patches, where the backend runs that faster.

``conv_general_dilated`` has the signature of ``jax.lax.conv_general_dilated`` and is
given to ``flax.linen.Conv`` (its ``conv_general_dilated`` field) by the convolution
stems (``tfm.models.vit``, ``tfm.models.detr``): the parameters stay ``nn.Conv``'s
(``kernel [*window, C_in, C_out]``, ``bias [C_out]``). Where ``tuning.conv_as_matmul()``
says so (the CPU backend), a channels-last convolution without dilation or groups is
computed as patches times the flattened kernel:

    patches [B, *out, prod(window) * C_in]  (the window's strided slices, concatenated)
    y = patches @ kernel.reshape(prod(window) * C_in, C_out)

The same sums in another order: equal to the convolution to float32 rounding. XLA's CPU
backend runs the weight gradient of a strided convolution as a window-dilated
convolution of its own (9 of the 89 ms of op time in a traced Fashion-MNIST ViT step);
as a matmul it is ``patchesᵀ @ grad``, under 1 ms there. Anything else (other layouts,
dilation, groups, other backends) goes to ``lax.conv_general_dilated`` unchanged.
"""

from __future__ import annotations

import itertools
import math

import jax.numpy as jnp
from jax import Array, lax

from tfm.layers import tuning


def _channels_last(n: int) -> tuple[str, str, str] | None:
    """The channels-last dimension names of an ``n``-D convolution (1 to 3 spatial axes), else None."""
    if not 1 <= n <= 3:
        return None
    spatial = "HWD"[:n]
    return "N" + spatial + "C", spatial + "IO", "N" + spatial + "C"


def conv_general_dilated(lhs: Array, rhs: Array, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None) -> Array:  # fmt: skip
    """``lax.conv_general_dilated``, as a patch matmul where ``tuning.conv_as_matmul()`` and the arguments allow."""
    n = lhs.ndim - 2
    names = _channels_last(n)
    plain = (
        tuning.conv_as_matmul() and names is not None and feature_group_count == 1 and batch_group_count == 1
        and all(d == 1 for d in (lhs_dilation or ())) and all(d == 1 for d in (rhs_dilation or ()))
        and preferred_element_type is None and dimension_numbers is not None
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == lax.conv_dimension_numbers(lhs.shape, rhs.shape, names)
    )  # fmt: skip
    if not plain:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
            batch_group_count=batch_group_count, precision=precision, preferred_element_type=preferred_element_type,
        )  # fmt: skip
    return conv_as_matmul(lhs, rhs, window_strides, padding, precision=precision)


def conv_as_matmul(x: Array, kernel: Array, strides, padding, precision=None) -> Array:
    """Channels-last ``x [B, *spatial, C_in]`` convolved with ``kernel [*window, C_in, C_out]``, as patches @ kernel."""
    window, n = kernel.shape[:-2], x.ndim - 2
    strides = tuple(strides)
    pads = lax.padtype_to_pads(x.shape[1:-1], window, strides, padding) if isinstance(padding, str) else padding
    x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), *((lo, hi, 0) for lo, hi in pads), (0, 0, 0)])
    out = [(x.shape[1 + d] - window[d]) // strides[d] + 1 for d in range(n)]
    if any(o < 1 for o in out):
        raise ValueError(f"convolution window {tuple(window)} is larger than the padded input {x.shape[1:-1]}")
    cuts = [
        x[(slice(None), *(slice(o, o + s * (m - 1) + 1, s) for o, s, m in zip(offset, strides, out)), slice(None))]
        for offset in itertools.product(*(range(k) for k in window))
    ]  # fmt: skip
    patches = jnp.concatenate(cuts, axis=-1)  # (window position, C_in) order: the kernel's flattening
    k = math.prod(window) * x.shape[-1]
    y = jnp.dot(patches.reshape(-1, k), kernel.reshape(k, kernel.shape[-1]), precision=precision)
    return y.reshape(x.shape[0], *out, kernel.shape[-1])


__all__ = ["conv_as_matmul", "conv_general_dilated"]
