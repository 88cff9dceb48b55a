"""Position-wise feed-forward networks (paper §3.3) and their gated variants.

``relu`` is the paper's FFN(x) = max(0, x W1 + b1) W2 + b2. ``gelu`` (exact,
BERT/ViT), ``gelu_tanh`` (GPT-2's approximation) and ``silu`` swap the
nonlinearity. ``swiglu`` / ``geglu`` are Shazeer's (2020) gated units:
(act(x W_gate) * x W_up) W_down; ``geglu_tanh`` gates with the tanh approximation
of GELU (T5 v1.1's "gated-gelu" as Hugging Face computes it).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import Array

from tfm import sharding as sh
from tfm.layers import cpu_rowwise, tuning
from tfm.layers.linear import Einsum, Initializer


def _gelu(x: Array) -> Array:
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(1.0 / math.sqrt(2.0), x.dtype)))


@jax.custom_vjp
def _gelu_hand_vjp(x: Array) -> Array:
    return _gelu(x)


def _gelu_bwd(x: Array, g: Array) -> tuple[Array]:
    """d/dx x Phi(x) = Phi(x) + x phi(x), recomputed from x (what PyTorch's ``gelu_backward`` computes).

    The barrier keeps XLA from sharing ``erf`` with the forward: shared, the forward would write Phi(x) out
    as a second tensor of the FFN's width for the backward to read, which costs more than computing it again.
    """
    x = jax.lax.optimization_barrier(x)
    cdf = 0.5 * (1.0 + jax.lax.erf(x * jnp.asarray(1.0 / math.sqrt(2.0), x.dtype)))
    pdf = jnp.exp(-0.5 * x * x) * jnp.asarray(1.0 / math.sqrt(2.0 * math.pi), x.dtype)
    return (g * (cdf + x * pdf),)


_gelu_hand_vjp.defvjp(lambda x: (_gelu(x), x), _gelu_bwd)


def gelu(x: Array) -> Array:
    """Exact GELU, x * Phi(x) = x/2 * (1 + erf(x / sqrt 2)) (Hendrycks & Gimpel 2016).

    ``jax.nn.gelu(approximate=False)`` computes the same through ``erfc``, which the
    CPU backend evaluates piecewise: this form is ~2.5x faster there (forward and
    gradient agree with it to float32 rounding). Where ``tuning.hand_vjp()`` says so,
    the gradient is the derivative written out, ``Phi(x) + x phi(x)``, instead of
    XLA's derivative of the expression. Where ``tuning.cpu_rowwise()`` says so, a float32
    ``x`` goes through the native kernel (``tfm.layers.cpu_rowwise.gelu``), the same
    forward and gradient in one pass each.
    """
    if x.dtype == jnp.float32 and cpu_rowwise.enabled():
        return cpu_rowwise.gelu(x)
    return _gelu_hand_vjp(x) if tuning.hand_vjp() else _gelu(x)


ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": gelu,
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # CLIP's (Radford et al. 2021) sigmoid approximation
}
GATED = {"swiglu": jax.nn.silu, "geglu": gelu, "geglu_tanh": ACTIVATIONS["gelu_tanh"]}


class MLP(nn.Module):
    """``[B, T, D] -> [B, T, D]`` with hidden width ``d_ff`` (F).

    Parameters: ``wi/kernel [D, F]`` (gated: ``wi_0`` gate and ``wi_1`` up),
    ``wo/kernel [F, D]`` (initialised by ``out_kernel_init`` if given), biases if ``use_bias``. ``dropout_rate`` drops the
    hidden activations (as ``torch.nn.TransformerEncoderLayer`` does).
    """

    d_ff: int
    activation: str = "relu"
    use_bias: bool = True
    dropout_rate: float = 0.0
    kernel_init: Initializer | None = None
    out_kernel_init: Initializer | None = None  # None: kernel_init (GPT-2 scales the output projection down)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        if self.activation not in ACTIVATIONS and self.activation not in GATED:
            raise ValueError(f"unknown activation {self.activation!r}; choose from {sorted({**ACTIVATIONS, **GATED})}")
        d = x.shape[-1]
        dense = functools.partial(
            Einsum, use_bias=self.use_bias, kernel_init=self.kernel_init, dtype=self.dtype, param_dtype=self.param_dtype
        )
        up = functools.partial(dense, (d, self.d_ff), (sh.EMBED, sh.MLP), in_axis=0, out_axis=1)
        if self.activation in GATED:
            gate = up(name="wi_0")("BTD,DF->BTF", x)
            hidden = GATED[self.activation](gate) * up(name="wi_1")("BTD,DF->BTF", x)
        else:
            hidden = ACTIVATIONS[self.activation](up(name="wi")("BTD,DF->BTF", x))
        hidden = nn.with_logical_constraint(hidden, (sh.BATCH, sh.LENGTH, sh.MLP))
        hidden = nn.Dropout(self.dropout_rate)(hidden, deterministic=deterministic)
        out = dense((self.d_ff, d), (sh.MLP, sh.EMBED), in_axis=0, out_axis=1, name="wo",
                    kernel_init=self.out_kernel_init or self.kernel_init)("BTF,FD->BTD", hidden)  # fmt: skip
        return nn.with_logical_constraint(out, (sh.BATCH, sh.LENGTH, sh.EMBED))
