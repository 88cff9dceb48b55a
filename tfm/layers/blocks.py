"""Encoder and decoder blocks, and stacks of them (``nn.scan`` over layers, ``nn.remat``).

A block wraps each sub-layer in a residual connection with dropout (paper
§5.4) and a norm, either after the sum (``norm_position="post"``, the paper's
``LayerNorm(x + Dropout(Sublayer(x)))``) or before the sub-layer
(``"pre"``: ``x + Dropout(Sublayer(Norm(x)))``, GPT-2/T5/ViT; the stack then
ends with a final norm).

``EncoderBlock`` is self-attention + FFN. It is also the block of
decoder-only models (GPT): give it a causal mask and ``decode=True`` for the
KV cache. ``DecoderBlock`` adds cross-attention over the encoder output.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import Array

from tfm import sharding as sh
from tfm.layers import tuning
from tfm.layers.attention import MultiHeadAttention
from tfm.layers.attention_kinds import AttentionOptions
from tfm.layers.dot_product import IMPLEMENTATIONS
from tfm.layers.feedforward import ACTIVATIONS, GATED, MLP
from tfm.layers.moe import MoE, MoEOptions
from tfm.layers.norms import NORMS, make_norm

# Named rematerialisation policies: what the backward pass may keep from the
# forward pass instead of recomputing it. "none" = no remat at all.
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


@dataclasses.dataclass(frozen=True)
class BlockConfig(MoEOptions, AttentionOptions):
    """Everything one block needs, and nothing more.

    ``num_experts > 0``: an MoE FFN (``MoEOptions``); ``attention``: the kind of
    self-attention (``AttentionOptions``), with ``causal`` telling the efficient
    kinds to hide future keys (they take no dense causal mask).
    """

    d_model: int
    num_heads: int
    d_ff: int
    head_dim: int | None = None  # None: d_model // num_heads
    num_kv_heads: int | None = None  # None: num_heads (MHA); 1: MQA; else GQA
    activation: str = "relu"
    norm: str = "layernorm"
    norm_epsilon: float = 1e-5
    norm_position: str = "post"
    attention_bias: bool = True
    key_bias: bool = True  # with attention_bias: whether the key projection has one too (Whisper's has none)
    mlp_bias: bool = True
    dropout_rate: float = 0.1  # residual dropout, paper §5.4
    attention_dropout_rate: float = 0.0
    activation_dropout_rate: float = 0.0
    use_rope: bool = False
    rope_base: float = 10_000.0
    attention_scale: float | None = None  # None: 1/sqrt(head_dim)
    attention_impl: str | None = None
    kernel_init_std: float | None = None  # None: Glorot uniform; else N(0, std^2)
    out_init_std: float | None = None  # the residual branches' output projections; None: as kernel_init_std
    decode: bool = False
    causal: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def __post_init__(self):
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.norm_position not in ("pre", "post"):
            raise ValueError(f"norm_position must be 'pre' or 'post', got {self.norm_position!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.activation not in ACTIVATIONS and self.activation not in GATED:
            raise ValueError(f"unknown activation {self.activation!r}")
        if self.attention_impl not in IMPLEMENTATIONS:
            raise ValueError(f"attention_impl must be one of {IMPLEMENTATIONS}, got {self.attention_impl!r}")
        for name in ("dropout_rate", "attention_dropout_rate", "activation_dropout_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        self.check_moe()
        self.check_attention()
        if self.attention != "full" and self.attention_dropout_rate > 0.0:
            raise ValueError(f"attention={self.attention!r} has no attention-weight dropout; "
                             f"set attention_dropout_rate=0 (got {self.attention_dropout_rate})")  # fmt: skip

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_width(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    def make_norm(self, name: str) -> nn.Module:
        return make_norm(self.norm, self.norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def kernel_init(self) -> nn.initializers.Initializer | None:
        return None if self.kernel_init_std is None else nn.initializers.normal(stddev=self.kernel_init_std)

    def out_kernel_init(self) -> nn.initializers.Initializer | None:
        """The init of the projections that write into the residual stream (attention ``out``, MLP ``wo``)."""
        return self.kernel_init() if self.out_init_std is None else nn.initializers.normal(stddev=self.out_init_std)


def _attention(cfg: BlockConfig, name: str, decode: bool) -> MultiHeadAttention:
    return MultiHeadAttention(
        num_heads=cfg.num_heads,
        head_dim=cfg.head_width,
        num_kv_heads=cfg.num_kv_heads,
        use_bias=cfg.attention_bias,
        key_bias=cfg.key_bias,
        dropout_rate=cfg.attention_dropout_rate,
        use_rope=cfg.use_rope,
        rope_base=cfg.rope_base,
        scale=cfg.attention_scale,
        decode=decode,
        implementation=cfg.attention_impl,
        kind=cfg.attention,
        causal=cfg.causal,
        window=cfg.attention_window,
        global_tokens=cfg.attention_global_tokens,
        global_stride=cfg.attention_global_stride,
        sow_weights=cfg.sow_attention_weights,
        kernel_init=cfg.kernel_init(),
        out_kernel_init=cfg.out_kernel_init(),
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        name=name,
    )


def _mlp(cfg: BlockConfig) -> nn.Module:
    if cfg.num_experts:
        return MoE(
            num_experts=cfg.num_experts,
            d_ff=cfg.expert_d_ff or cfg.d_ff,
            top_k=cfg.experts_per_token,
            activation=cfg.activation,
            use_bias=cfg.mlp_bias,
            dispatch=cfg.moe_dispatch,
            capacity_factor=cfg.capacity_factor,
            group_size=cfg.moe_group_size,
            renormalize=cfg.moe_renormalize,
            load_balance_weight=cfg.load_balance_weight,
            router_z_weight=cfg.router_z_weight,
            dropout_rate=cfg.activation_dropout_rate,
            kernel_init=cfg.kernel_init(),
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            name="moe",
        )
    return MLP(
        d_ff=cfg.d_ff,
        activation=cfg.activation,
        use_bias=cfg.mlp_bias,
        dropout_rate=cfg.activation_dropout_rate,
        kernel_init=cfg.kernel_init(),
        out_kernel_init=cfg.out_kernel_init(),
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        name="mlp",
    )


class _Residual(nn.Module):
    """Helper shared by both blocks: one sub-layer with dropout, residual and norm."""

    config: BlockConfig

    def wrap(self, x: Array, sublayer: Callable[[Array], Array], norm: nn.Module, deterministic: bool) -> Array:
        cfg = self.config
        drop = nn.Dropout(cfg.dropout_rate)
        if cfg.norm_position == "pre":
            # The norm hands x back for the sum: its native backward then adds the sum's gradient itself.
            x, normed = norm(x, keep_input=True)
            return x + drop(sublayer(normed), deterministic=deterministic)
        return norm(x + drop(sublayer(x), deterministic=deterministic))


class EncoderBlock(_Residual):
    """Self-attention + FFN. ``[B, T, D] -> [B, T, D]``."""

    INPUTS: ClassVar[tuple[str, ...]] = ("mask", "bias", "positions")  # what a Stack passes, in this order

    @nn.compact
    def __call__(
        self,
        x: Array,
        mask: Array | None = None,
        bias: Array | None = None,
        positions: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        cfg = self.config
        x = nn.with_logical_constraint(x, (sh.BATCH, sh.LENGTH, sh.EMBED))
        norm = cfg.make_norm
        attn = _attention(cfg, "self_attention", cfg.decode)
        x = self.wrap(
            x,
            lambda y: attn(y, mask=mask, bias=bias, positions=positions, deterministic=deterministic),
            norm("attention_norm"),
            deterministic,
        )
        mlp = _mlp(cfg)
        x = self.wrap(x, lambda y: mlp(y, deterministic=deterministic), norm("mlp_norm"), deterministic)
        return nn.with_logical_constraint(x, (sh.BATCH, sh.LENGTH, sh.EMBED))


class DecoderBlock(_Residual):
    """Masked self-attention + cross-attention over ``encoded`` + FFN. ``[B, T, D] -> [B, T, D]``."""

    INPUTS: ClassVar[tuple[str, ...]] = ("encoded", "mask", "cross_mask", "bias", "positions")

    @nn.compact
    def __call__(
        self,
        x: Array,
        encoded: Array,
        mask: Array | None = None,
        cross_mask: Array | None = None,
        bias: Array | None = None,
        positions: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """``mask`` and ``bias`` are the self-attention's; ``cross_mask`` the cross-attention's."""
        cfg = self.config
        x = nn.with_logical_constraint(x, (sh.BATCH, sh.LENGTH, sh.EMBED))
        norm = cfg.make_norm
        self_attn = _attention(cfg, "self_attention", cfg.decode)
        x = self.wrap(
            x,
            lambda y: self_attn(y, mask=mask, bias=bias, positions=positions, deterministic=deterministic),
            norm("self_attention_norm"),
            deterministic,
        )
        # Cross-attention has no positional signal of its own (RoPE is for self-attention).
        cross_cfg = dataclasses.replace(
            cfg, use_rope=False, causal=False, attention="flash" if cfg.attention == "flash" else "full"
        )
        cross_attn = _attention(cross_cfg, "cross_attention", decode=False)
        x = self.wrap(
            x,
            lambda y: cross_attn(y, encoded, mask=cross_mask, deterministic=deterministic),
            norm("cross_attention_norm"),
            deterministic,
        )
        mlp = _mlp(cfg)
        x = self.wrap(x, lambda y: mlp(y, deterministic=deterministic), norm("mlp_norm"), deterministic)
        return nn.with_logical_constraint(x, (sh.BATCH, sh.LENGTH, sh.EMBED))


def _scan_body(block: nn.Module, carry: Array, *args):
    return block(carry, *args), None


class _Group(nn.Module):
    """Blocks applied in sequence, one per config: the scanned unit of a stack with ``moe_every > 1``."""

    block: type[nn.Module]
    configs: tuple[BlockConfig, ...]

    @nn.compact
    def __call__(self, x: Array, *args) -> Array:
        for i, cfg in enumerate(self.configs):
            x = self.block(cfg, name=f"block_{i}")(x, *args)
        return x


class Stack(nn.Module):
    """``num_layers`` blocks of one kind applied in sequence.

    ``scan=True`` runs them with ``nn.scan``: the parameters of all layers are
    stacked on a leading ``layers`` axis (``<name>/layers/...`` with shape
    ``[L, ...]``) and the block is traced and compiled once, so compile time
    does not grow with depth. ``scan=False`` is a plain loop with layers named
    ``layers_0 .. layers_{L-1}`` (easier to read, slower to compile).
    ``remat_policy`` names an entry of ``REMAT_POLICIES``. With pre-LN the stack
    ends with a norm (``final_norm``).

    Mixture-of-Experts with ``moe_every = k > 1``: layers k, 2k, ... are MoE
    blocks, the others dense; the scanned unit is then a group of k blocks
    (``layers/block_0 .. block_{k-1}``, ``num_layers / k`` scan steps).

    ``__call__(x, *, deterministic, **inputs)`` passes the named inputs to every
    block unchanged: those of the block's ``INPUTS`` (``EncoderBlock``: ``mask``,
    ``bias``, ``positions``; ``DecoderBlock``: also ``encoded`` and ``cross_mask``),
    each None unless given. A name the block does not take is refused.
    """

    block: type[nn.Module]
    config: BlockConfig
    num_layers: int
    scan: bool = True
    remat_policy: str = "none"
    unroll: int | None = None

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True, **inputs: Array | None) -> Array:
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"unknown remat_policy {self.remat_policy!r}; choose from {sorted(REMAT_POLICIES)}")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        names = getattr(self.block, "INPUTS", ())
        unknown = sorted(set(inputs) - set(names))
        if unknown:
            raise ValueError(f"{self.block.__name__} takes the inputs {names}, not {unknown}")
        # The block's call is (x, *inputs in INPUTS order, deterministic): positional, as nn.scan wants.
        args = tuple(inputs.get(name) for name in names)
        slots = len(args)
        cfg = self.config
        k = cfg.moe_every if cfg.num_experts else 1
        if self.num_layers % k:
            raise ValueError(f"num_layers={self.num_layers} is not a multiple of moe_every={k}")
        dense = dataclasses.replace(cfg, num_experts=0)
        layer_configs = [cfg if (i + 1) % k == 0 else dense for i in range(self.num_layers)]

        def remat(cls):
            if self.remat_policy == "none":
                return cls
            # deterministic, a Python bool, is the block's last positional argument;
            # flax counts ``self`` as argument 0: (self, x, *slots, deterministic).
            policy = REMAT_POLICIES[self.remat_policy]
            return nn.remat(cls, policy=policy, static_argnums=(slots + 2,), prevent_cse=not self.scan)

        if self.scan:
            if k > 1:  # the scanned unit: k - 1 dense blocks, then one MoE block
                unit = remat(_Group)(self.block, tuple(layer_configs[:k]), name="layers")
            else:
                unit = remat(self.block)(cfg, name="layers")
            scanned = nn.scan(
                _scan_body,
                variable_axes={"params": 0, "cache": 0, "intermediates": 0, "aux_loss": 0, "moe_stats": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=nn.broadcast,
                length=self.num_layers // k,
                unroll=tuning.scan_unroll(self.num_layers // k) if self.unroll is None else self.unroll,
                metadata_params={nn.PARTITION_NAME: sh.LAYERS},
            )
            x, _ = scanned(unit, x, *args, deterministic)
        else:
            block_cls = remat(self.block)
            for i in range(self.num_layers):
                x = block_cls(layer_configs[i], name=f"layers_{i}")(x, *args, deterministic)
        if self.config.norm_position == "pre":
            x = self.config.make_norm("final_norm")(x)
        return x
