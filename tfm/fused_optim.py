"""The optimizer update and the non-finite guard as one native pass over the parameters (CPU).

The train step's update is ``optax.chain(clip_by_global_norm(c), adamw(...))``, then
``optax.apply_updates``, then the guard that keeps the old state when the loss, the gradient
norm or any new parameter is not finite. XLA runs these as several passes over the
parameters and their two moments, each reading and writing the whole state, and the guard's
select reads the old and new state once more. ``kernels/adamw_cpu.cc`` updates the parameters
and moments in place, on XLA's intra-op threads: a first pass checks that every new parameter
would be finite (reading the state, writing nothing), and on an accepted step a second pass
writes the new values; a refused step writes nothing.

``FusedAdamW.update`` returns what the optax chain and the guard return, with the same state
structure (``ScaleByAdamState``'s count and moments, the schedule's count), so a checkpoint
written on one path resumes on the other. The sums are optax's, element by element, except
that the divisions by the global norm and by the bias corrections are multiplications by
reciprocals taken once per step (a division per element made the pass compute-bound), and the
compiler may fuse a multiply and an add that XLA rounds apart, so the two paths agree to
float32 rounding, not bit for bit. ``tuning.FUSED_OPTIMIZER`` picks it (default: the CPU
backend with one device, where the kernels build); float32 parameters only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tfm import optim
from tfm.layers import cpu_kernels, tuning

_TARGET = "tfm_adamw_cpu"
_STATES = (optax.ScaleByAdamState, optax.ScaleByScheduleState)


@dataclasses.dataclass(frozen=True)
class FusedAdamW:
    """The hyperparameters of ``tfm.optim.make_optimizer``'s Adam/AdamW, for the fused update."""

    learning_rate: float | optax.Schedule
    b1: float
    b2: float
    eps: float
    weight_decay: float
    clip_norm: float | None
    decay_mask: Any = None  # params -> tree of bools (AdamW's mask); None: no decay anywhere

    def supports(self, params: Any, opt_state: Any) -> bool:
        """float32 parameters and the state of the chain this describes: one Adam state, at most one schedule count."""
        if not all(x.dtype == jnp.float32 for x in jax.tree.leaves(params)):
            return False
        nodes = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, _STATES))
        adam = [x for x in nodes if isinstance(x, optax.ScaleByAdamState)]
        scheds = [x for x in nodes if isinstance(x, optax.ScaleByScheduleState)]
        if len(adam) != 1 or len(scheds) != (1 if callable(self.learning_rate) else 0):
            return False
        if len(nodes) != len(adam) + len(scheds):  # array state this update would not carry over
            return False
        treedef = jax.tree.structure(params)
        return jax.tree.structure(adam[0].mu) == treedef and jax.tree.structure(adam[0].nu) == treedef

    def update(self, grads: Any, grad_norm: jax.Array, params: Any, opt_state: Any, ok: jax.Array):
        """``(params, opt_state, params_ok)``: the updated state, or the old one where ``ok`` or ``params_ok`` is False.

        ``grad_norm`` is ``optax.tree.norm(grads)`` (the clipping's norm); ``ok`` says whether the
        loss and the gradient norm are finite; ``params_ok`` whether every new parameter was.
        ``RuntimeError`` where the kernels cannot be built (``cpu_kernels.available()`` says so beforehand).
        """
        if not cpu_kernels.available():
            raise RuntimeError("fused_optim: tfm's CPU kernels could not be built (see the log)")
        leaves, treedef = jax.tree.flatten(params)
        nodes = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, _STATES))
        adam = next(x for x in nodes if isinstance(x, optax.ScaleByAdamState))
        sched = next((x for x in nodes if isinstance(x, optax.ScaleByScheduleState)), None)
        count = optax.safe_increment(adam.count)
        lr = self.learning_rate if sched is None else self.learning_rate(sched.count)
        # As optax's bias correction computes them.
        bc1, bc2 = 1 - self.b1**count, 1 - self.b2**count
        scalars = jnp.stack([jnp.asarray(x, jnp.float32) for x in
                             (lr, grad_norm, self.clip_norm or 0.0, bc1, bc2, ok)])  # fmt: skip
        mask = self.decay_mask(params) if (self.decay_mask is not None and self.weight_decay) else None
        decayed = [bool(m) for m in treedef.flatten_up_to(mask)] if mask is not None else [False] * len(leaves)
        shapes = [jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in leaves]
        n = len(leaves)
        # In place: arguments 1 + i (parameters), 1 + 2n + i and 1 + 3n + i (moments) are results i, n + i, 2n + i.
        aliases = {1 + k * n + i: r * n + i for r, k in enumerate((0, 2, 3)) for i in range(n)}
        call = jax.ffi.ffi_call(_TARGET, (*shapes, *shapes, *shapes, jax.ShapeDtypeStruct((), jnp.float32)),
                                input_output_aliases=aliases)  # fmt: skip
        out = call(scalars, *leaves, *treedef.flatten_up_to(grads), *treedef.flatten_up_to(adam.mu),
                   *treedef.flatten_up_to(adam.nu), b1=np.float32(self.b1), b2=np.float32(self.b2),
                   eps=np.float32(self.eps), weight_decay=np.float32(self.weight_decay),
                   decayed=np.asarray(decayed, np.int64))  # fmt: skip
        params_ok = out[3 * n] > 0
        kept = ok & params_ok

        def advance(node):
            if isinstance(node, optax.ScaleByAdamState):
                return optax.ScaleByAdamState(count=jnp.where(kept, count, adam.count),
                                              mu=treedef.unflatten(out[n : 2 * n]),
                                              nu=treedef.unflatten(out[2 * n : 3 * n]))  # fmt: skip
            if isinstance(node, optax.ScaleByScheduleState):
                return optax.ScaleByScheduleState(count=jnp.where(kept, optax.safe_increment(node.count), node.count))
            return node

        new_state = jax.tree.map(advance, opt_state, is_leaf=lambda x: isinstance(x, _STATES))
        return treedef.unflatten(out[:n]), new_state, params_ok


def for_optimizer(learning_rate, *, name: str, b1: float, b2: float, eps: float, weight_decay: float,
                  clip_norm: float | None, devices: int = 1) -> FusedAdamW | None:  # fmt: skip
    """The fused form of ``make_optimizer(learning_rate, ...)`` where it runs, else None.

    It runs where ``tuning.fused_optimizer()`` picks it, the kernels build, and the mesh has one
    device (the kernel has no partitioning rule: a sharded state would be gathered).
    """
    if name not in ("adam", "adamw") or devices > 1 or not tuning.fused_optimizer() or not cpu_kernels.available():
        return None
    decayed = name == "adamw"
    return FusedAdamW(learning_rate, b1, b2, eps, weight_decay if decayed else 0.0, clip_norm,
                      optim.decay_mask if decayed else None)  # fmt: skip


__all__ = ["FusedAdamW", "for_optimizer"]
