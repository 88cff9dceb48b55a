"""Mixture-of-Experts feed-forward layer: a router sends each token to its top-k expert FFNs.

    x [B, T, D] -> router logits [B, T, E] (float32) -> softmax -> top-k experts per token
      -> each chosen expert's FFN (any activation the dense MLP supports)
      -> outputs summed with the combine weights (the top-k probabilities,
         renormalised over the chosen experts unless ``renormalize=False``)

Top-1 is the Switch Transformer (Fedus et al. 2021), top-2 GShard (Lepikhin et al.
2020) and Mixtral. Two ways to move tokens to their experts:

``dispatch="capacity"`` (GShard/Switch): tokens are split into groups (``group_size``
tokens, default one sequence). Each expert takes at most
``C = ceil(capacity_factor * group_size * k / E)`` tokens per group, filled in
priority order: every token's first choice before any second choice, in token
order within a choice. Assignments past capacity are dropped; a token whose every
choice is dropped gets 0 from this layer and keeps only the residual. Dispatch and
combine are one-hot einsums ``[G, S, E, C]``; the expert inputs ``[E, G, C, D]``
carry the ``expert`` logical axis, so with experts sharded over the ``expert`` mesh
axis and the batch over it too, XLA turns the dispatch einsum into an all-to-all.

``dispatch="dropless"`` (MegaBlocks-style sort and segment): the (token, expert)
assignments are sorted by expert and every expert multiplies its contiguous rows
with ``jax.lax.ragged_dot``; nothing is dropped, no capacity padding is computed.
With the experts split over an ``expert`` mesh axis it runs under ``jax.shard_map``:
each device gathers its group's tokens, runs its own experts and reduce-scatters
the outputs back (tokens move, expert weights never do).

Auxiliary losses are sown into the ``aux_loss`` collection (the trainer adds them to
the loss), already multiplied by their weights:

- ``load_balance``: Switch eq. (4), ``E * sum_e f_e * P_e`` where ``f_e`` is the
  fraction of the N*k assignments routed to expert e and ``P_e`` the mean router
  probability of e. A uniform router gives exactly 1.0.
- ``router_z``: ST-MoE's router z-loss, ``mean(logsumexp(logits)^2)``.

Router statistics go to the ``moe_stats`` collection: ``load`` (``f``, [E]) and
``drop_fraction`` (share of assignments dropped; 0 when dropless).

Parameters: ``router/kernel [D, E]``, ``wi/kernel [E, D, F]`` (gated: ``wi_0``,
``wi_1``), ``wo/kernel [E, F, D]`` and, with ``use_bias``, ``[E, F]`` / ``[E, D]``
biases.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import Array

from tfm import sharding as sh
from tfm.layers.feedforward import ACTIVATIONS, GATED
from tfm.layers.linear import Initializer, as_dtype

DISPATCH = ("capacity", "dropless")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEOptions:
    """The MoE fields that block and model configs share (``num_experts=0``: dense FFNs only).

    ``moe_every=k``: in a stack, layers k, 2k, 3k, ... (1-based) get the MoE FFN and
    the others the dense one (Switch: every other layer, ``k=2``; Mixtral: ``k=1``).
    """

    num_experts: int = 0
    experts_per_token: int = 2
    moe_every: int = 1
    expert_d_ff: int | None = None  # None: the dense d_ff
    moe_dispatch: str = "capacity"
    capacity_factor: float = 1.25
    moe_group_size: int | None = None
    moe_renormalize: bool = True
    load_balance_weight: float = 0.01
    router_z_weight: float = 1e-3

    def check_moe(self) -> None:
        if self.num_experts < 0:
            raise ValueError(f"num_experts must be >= 0, got {self.num_experts}")
        if not self.num_experts:
            return
        if self.moe_every < 1:
            raise ValueError(f"moe_every must be >= 1, got {self.moe_every}")
        check_routing(self.num_experts, self.experts_per_token, self.moe_dispatch, self.capacity_factor)


def check_routing(num_experts: int, top_k: int, dispatch: str, capacity_factor: float) -> None:
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k (experts_per_token)={top_k} must be in [1, num_experts={num_experts}]")
    if dispatch not in DISPATCH:
        raise ValueError(f"dispatch must be one of {DISPATCH}, got {dispatch!r}")
    if dispatch == "capacity" and capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")


def expert_kernel_init(in_axis: int, out_axis: int) -> Initializer:
    """Glorot uniform per expert: fans over (in, out), the leading expert axis is a batch axis."""
    return nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=in_axis, out_axis=out_axis, batch_axis=(0,))


def capacity(group_size: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert per group: ``ceil(capacity_factor * group_size * k / E)``, at least 1."""
    return max(1, math.ceil(capacity_factor * group_size * top_k / num_experts))


def route(logits: Array, top_k: int, renormalize: bool = True) -> tuple[Array, Array, Array]:
    """``logits [..., E]`` -> ``(probs [..., E], gates [..., k], experts [..., k])`` in float32."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    gates, experts = jax.lax.top_k(probs, top_k)
    if renormalize:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    return probs, gates, experts


def expert_load(experts: Array, num_experts: int) -> Array:
    """``f [E]``: the share of all N*k assignments ``experts [..., k]`` routed to each expert."""
    return jax.nn.one_hot(experts, num_experts, dtype=jnp.float32).reshape(-1, num_experts).sum(0) / experts.size


def load_balance_loss(probs: Array, experts: Array, load: Array | None = None) -> Array:
    """Switch load-balancing loss ``E * sum_e f_e P_e`` over all tokens (any leading shape).

    ``load`` is ``expert_load(experts, E)`` when the caller has it already.
    """
    e = probs.shape[-1]
    f = expert_load(experts, e) if load is None else load
    return e * jnp.sum(f * probs.reshape(-1, e).mean(0))


def router_z_loss(logits: Array) -> Array:
    """ST-MoE (Zoph et al. 2022) eq. (5): ``mean(logsumexp(logits)^2)``."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))


def capacity_dispatch(experts: Array, gates: Array, num_experts: int, cap: int) -> tuple[Array, Array]:
    """``experts, gates [G, S, k]`` -> ``dispatch`` (bool) and ``combine`` (float32), both ``[G, S, E, C]``.

    Priority: all first choices (in token order), then all second choices, ...
    An assignment whose position in its expert's queue is >= ``cap`` is dropped.
    """
    g, s, k = experts.shape
    choice = jax.nn.one_hot(experts, num_experts, dtype=jnp.int32)  # [G, S, k, E]
    by_priority = choice.transpose(0, 2, 1, 3).reshape(g, k * s, num_experts)  # slot-major
    position = jnp.cumsum(by_priority, axis=1) - 1  # queue position at the chosen expert
    keep = (by_priority == 1) & (position < cap)
    slot = jax.nn.one_hot(jnp.where(keep, position, -1), cap, dtype=jnp.float32)  # [G, kS, E, C]; -1 -> zeros
    slot = slot.reshape(g, k, s, num_experts, cap)
    dispatch = slot.sum(1) > 0  # a token never picks one expert twice
    combine = jnp.einsum("GKSEC,GSK->GSEC", slot, gates.astype(jnp.float32))
    return dispatch, combine


def _dropless(x, experts, gates, wi, wo, bi, bo, hidden, num_experts: int) -> Array:
    """Sort the (token, expert) assignments by expert; each expert multiplies its contiguous rows.

    ``x [N, D]`` or ``[B, T, D]``, ``experts, gates [..., k]`` (ids may be ``num_experts`` for
    "not here": those rows sort last, outside every group, and get weight 0). Returns ``x``'s shape.
    """
    shape, d = x.shape, x.shape[-1]
    k = experts.shape[-1]
    x = x.reshape(-1, d)
    n = x.shape[0]
    flat = experts.reshape(n * k)
    order = jnp.argsort(flat, stable=True)
    token = order // k  # assignment j belongs to token j // k
    sorted_experts = jnp.minimum(flat[order], num_experts - 1)  # (for bias lookup only)
    sizes = jnp.bincount(flat, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    xs = x[token]  # [N*k, D], grouped by expert
    pre = [jax.lax.ragged_dot(xs, w, sizes) for w in wi]
    if bi is not None:
        pre = [p + bv[sorted_experts] for p, bv in zip(pre, bi)]
    ys = jax.lax.ragged_dot(hidden(pre), wo, sizes)
    if bo is not None:
        ys = ys + bo[sorted_experts]
    w = jnp.where(flat[order] < num_experts, gates.reshape(n * k)[order], 0).astype(ys.dtype)
    return jnp.zeros((n, d), ys.dtype).at[token].add(ys * w[:, None]).reshape(shape)


def _expert_mesh_axes():
    """``(mesh axis of the experts, mesh axes of the batch)`` when the experts are split over
    more than one device of the current mesh, else ``(None, None)``."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None, None
    axis = nn.logical_to_mesh_axes((sh.EXPERT,))[0]
    if axis is None or not isinstance(axis, str) or dict(mesh.shape).get(axis, 1) == 1:
        return None, None
    batch = nn.logical_to_mesh_axes((sh.BATCH,))[0]
    batch = () if batch is None else (batch,) if isinstance(batch, str) else tuple(batch)
    return axis, batch


def _dropless_expert_parallel(x, experts, gates, wi, wo, bi, bo, act, gated, axis, batch_axes) -> Array:
    """Dropless dispatch with the experts split over mesh axis ``axis`` (``jax.shard_map``).

    Each device holds E/ep experts. The tokens of the ``axis`` group are all-gathered
    (tokens, never expert weights, move), each device runs its own experts on the
    assignments routed to them, and a reduce-scatter returns every device the sum over
    experts for its own tokens. Without the batch split over ``axis``, every device
    already holds the group's tokens and a psum finishes the job.
    """
    from jax.sharding import PartitionSpec as P

    mesh = jax.sharding.get_abstract_mesh()
    ep = dict(mesh.shape)[axis]
    e = wo.shape[0]
    if e % ep:
        raise ValueError(f"num_experts={e} is not divisible by the {ep} devices of mesh axis {axis!r}")
    e_local = e // ep
    gathered = axis in batch_axes
    tokens = P(batch_axes or None)
    split = P(axis)

    def hidden(pre):
        return act(pre[0]) * pre[1] if gated else act(pre[0])

    def local(x, experts, gates, wi, wo, bi, bo):
        shape = x.shape
        x, experts, gates = x.reshape(-1, shape[-1]), experts.reshape(-1, experts.shape[-1]), gates.reshape(-1, gates.shape[-1])
        if gathered:
            x, experts, gates = (jax.lax.all_gather(a, axis, tiled=True) for a in (x, experts, gates))
        first = jax.lax.axis_index(axis) * e_local
        mine = (experts >= first) & (experts < first + e_local)
        local_ids = jnp.where(mine, experts - first, e_local)  # e_local: another device's expert
        y = _dropless(x, local_ids, gates, wi, wo, bi, bo, hidden, e_local)
        y = jax.lax.psum_scatter(y, axis, scatter_dimension=0, tiled=True) if gathered else jax.lax.psum(y, axis)
        return y.reshape(shape)

    return jax.shard_map(
        local, mesh=mesh, in_specs=(tokens, tokens, tokens, split, split, split, split), out_specs=tokens,
    )(x, experts, gates, wi, wo, bi, bo)  # fmt: skip


class MoE(nn.Module):
    """``[B, T, D] -> [B, T, D]``: top-k routed expert FFNs (see the module docstring)."""

    num_experts: int
    d_ff: int
    top_k: int = 2
    activation: str = "relu"
    use_bias: bool = False
    dispatch: str = "capacity"
    capacity_factor: float = 1.25
    group_size: int | None = None  # capacity groups; None = one sequence per group
    renormalize: bool = True
    load_balance_weight: float = 0.01
    router_z_weight: float = 1e-3
    dropout_rate: float = 0.0
    kernel_init: Initializer | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _check(self, x: Array) -> None:
        if x.ndim != 3:
            raise ValueError(f"MoE wants x [B, T, D], got {x.shape}")
        if self.activation not in ACTIVATIONS and self.activation not in GATED:
            raise ValueError(f"unknown activation {self.activation!r}; choose from {sorted({**ACTIVATIONS, **GATED})}")
        check_routing(self.num_experts, self.top_k, self.dispatch, self.capacity_factor)

    def _param(self, name, shape, axes, init):
        return self.param(name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype)

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        self._check(x)
        b, t, d = x.shape
        e, f = self.num_experts, self.d_ff
        gated = self.activation in GATED

        router = self._param("router", (d, e), (sh.EMBED, None), nn.initializers.variance_scaling(1.0, "fan_in", "normal"))
        logits = jnp.einsum("BTD,DE->BTE", x.astype(jnp.float32), as_dtype(router, jnp.float32))
        probs, gates, experts = route(logits, self.top_k, self.renormalize)

        init_in = self.kernel_init or expert_kernel_init(1, 2)
        init_out = self.kernel_init or expert_kernel_init(1, 2)
        names = ("wi_0", "wi_1") if gated else ("wi",)
        wi = [as_dtype(self._param(n, (e, d, f), (sh.EXPERT, sh.EMBED, sh.MLP), init_in), self.dtype) for n in names]
        wo = as_dtype(self._param("wo", (e, f, d), (sh.EXPERT, sh.MLP, sh.EMBED), init_out), self.dtype)
        bi = bo = None
        if self.use_bias:
            zeros = nn.initializers.zeros_init()
            bi = [self._param(f"{n}_bias", (e, f), (sh.EXPERT, sh.MLP), zeros).astype(self.dtype) for n in names]
            bo = self._param("wo_bias", (e, d), (sh.EXPERT, sh.EMBED), zeros).astype(self.dtype)
        act = GATED[self.activation] if gated else ACTIVATIONS[self.activation]
        drop = nn.Dropout(self.dropout_rate)

        def hidden(pre):  # pre: one [..., F] per input kernel
            h = act(pre[0]) * pre[1] if gated else act(pre[0])
            return drop(h, deterministic=deterministic)

        xc = x.astype(self.dtype)
        if self.dispatch == "capacity":
            s = self.group_size or t
            if (b * t) % s:
                raise ValueError(f"group_size={s} does not divide the {b}x{t}={b * t} tokens")
            g = b * t // s
            cap = capacity(s, e, self.top_k, self.capacity_factor)
            dispatch, combine = capacity_dispatch(experts.reshape(g, s, -1), gates.reshape(g, s, -1), e, cap)
            xg = nn.with_logical_constraint(xc.reshape(g, s, d), (sh.BATCH, sh.LENGTH, sh.EMBED))
            # The all-to-all: [G(batch), S, D] -> [E(expert), G, C, D].
            xe = jnp.einsum("GSEC,GSD->EGCD", dispatch.astype(self.dtype), xg)
            xe = nn.with_logical_constraint(xe, (sh.EXPERT, sh.EXPERT_BATCH, None, sh.EMBED))
            pre = [jnp.einsum("EGCD,EDF->EGCF", xe, w) for w in wi]
            if bi is not None:
                pre = [p + bv[:, None, None] for p, bv in zip(pre, bi)]
            h = nn.with_logical_constraint(hidden(pre), (sh.EXPERT, sh.EXPERT_BATCH, None, sh.MLP))
            ye = jnp.einsum("EGCF,EFD->EGCD", h, wo)
            if bo is not None:
                ye = ye + bo[:, None, None]
            ye = nn.with_logical_constraint(ye, (sh.EXPERT, sh.EXPERT_BATCH, None, sh.EMBED))
            y = jnp.einsum("EGCD,GSEC->GSD", ye, combine.astype(self.dtype)).reshape(b, t, d)
            kept = jnp.sum(dispatch)
            drop_fraction = 1.0 - kept / (b * t * self.top_k)
        else:
            axis, batch_axes = _expert_mesh_axes()
            if axis is not None and b % math.prod(dict(jax.sharding.get_abstract_mesh().shape)[a] for a in batch_axes):
                axis = None  # a batch too small to split (an init example): leave it to XLA's partitioner
            if axis is not None:
                if self.dropout_rate > 0.0 and not deterministic:
                    raise ValueError("dropless dispatch over an expert mesh axis has no activation dropout; set it to 0")
                y = _dropless_expert_parallel(xc, experts, gates, wi, wo, bi, bo, act, gated, axis, batch_axes)
            else:
                y = _dropless(xc, experts, gates, wi, wo, bi, bo, hidden, e)
            drop_fraction = jnp.zeros((), jnp.float32)

        load = expert_load(experts, e)
        self.sow("aux_loss", "load_balance", self.load_balance_weight * load_balance_loss(probs, experts, load))
        self.sow("aux_loss", "router_z", self.router_z_weight * router_z_loss(logits))
        self.sow("moe_stats", "load", load)
        self.sow("moe_stats", "drop_fraction", drop_fraction.astype(jnp.float32))
        return nn.with_logical_constraint(y.astype(self.dtype), (sh.BATCH, sh.LENGTH, sh.EMBED))
