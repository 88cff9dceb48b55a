"""Small pieces the model families share: the config base, decode positions, parameter counts."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import Array

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Base of every family's config: the family's own fields plus ``block``, one ``BlockConfig``.

    ``block`` (``tfm.layers.blocks.BlockConfig``) holds what every layer of the family
    shares: widths, heads, norm, activation, dropout, dtypes, the attention kind
    (``AttentionOptions``) and the FFN-or-MoE choice (``MoEOptions``). No family
    redeclares those fields, so every family takes every attention kind and MoE;
    ``check()`` refuses the combinations a family cannot run, with the reason.

    The field names of a config and of its block never clash, so one flat name
    space addresses both: ``cfg.replace(d_model=64, num_layers=2)`` changes the
    block's ``d_model`` and the config's ``num_layers``; ``cfg.get("d_model")`` reads
    either. The command line uses the same names (``--config.model.d_model=64``).

    ``DERIVED``: block fields the family sets itself from its own fields (GPT's
    ``causal`` and ``use_rope`` from ``position``); ``replace`` refuses them.
    """

    DERIVED: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        clash = set(self.own_fields()) & set(self.block_fields())
        if clash:  # a programming error in a family's config, not a user error
            raise TypeError(f"{type(self).__name__} redeclares block fields {sorted(clash)}")
        self.check()

    def check(self) -> None:
        """Raise ``ValueError`` naming what this family cannot run (override per family)."""

    @classmethod
    def own_fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "block")

    def block_fields(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.block) if f.name not in self.DERIVED)

    def field_names(self) -> tuple[str, ...]:
        """Every name ``replace`` and ``get`` take: the config's own fields, then the block's."""
        return self.own_fields() + self.block_fields()

    def get(self, name: str) -> Any:
        if name in self.own_fields():
            return getattr(self, name)
        if name in self.block_fields():
            return getattr(self.block, name)
        raise AttributeError(f"{type(self).__name__} has no field {name!r}")

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with fields of the config or of its block replaced, by name."""
        own, block = {}, {}
        for name, value in changes.items():
            if name in self.DERIVED:
                raise ValueError(f"{type(self).__name__} sets {name} itself (from its own fields); it cannot be given")
            if name in self.own_fields():
                own[name] = value
            elif name in self.block_fields():
                block[name] = value
            else:
                raise ValueError(f"{type(self).__name__} has no field {name!r}")
        if block:
            own["block"] = dataclasses.replace(own.get("block", self.block), **block)
        return dataclasses.replace(self, **own)


class DecodePositions(nn.Module):
    """Positions of the tokens in this call, continuing across calls when decoding.

    Without ``decode`` it returns ``(arange(T), arange(T))``. With ``decode``,
    the ``init`` call (made at the maximal length, like the KV cache) stores
    the key positions ``0..S_max-1`` and a counter in the ``cache`` collection;
    each later call returns the T query positions ``counter .. counter+T-1``
    and all S_max key positions, then advances the counter.
    """

    decode: bool = False

    @nn.compact
    def __call__(self, length: int) -> tuple[Array, Array]:
        if not self.decode:
            pos = jnp.arange(length)
            return pos, pos
        initialized = self.has_variable("cache", "index")
        index = self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
        kv = self.variable("cache", "kv_positions", lambda: jnp.arange(length, dtype=jnp.int32))
        if not initialized:
            pos = jnp.arange(length)
            return pos, pos
        start = index.value
        index.value = start + length
        return start + jnp.arange(length), kv.value


def count_params(tree: Any) -> int:
    """Number of scalars in a (possibly boxed / ShapeDtypeStruct) pytree."""
    return sum(int(x.size) for x in jax.tree.leaves(nn.unbox(tree)))


EXPERT_WEIGHTS = ("wi", "wi_0", "wi_1", "wo", "wi_bias", "wi_0_bias", "wi_1_bias", "wo_bias")


def active_params(params: Any, config: "ModelConfig") -> int:
    """Parameters one token uses: everything but the experts, plus k of the E experts of each MoE layer."""
    experts = config.block.num_experts
    total = expert = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(nn.unbox(params)):
        keys = [str(getattr(k, "key", k)) for k in path]
        total += int(leaf.size)
        if "moe" in keys and keys[-1] in EXPERT_WEIGHTS:
            expert += int(leaf.size)
    if not experts:
        return total
    return total - expert + expert * config.block.experts_per_token // experts
