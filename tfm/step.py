"""The train and eval steps as free, jittable functions of ``(state, batch)``.

``make_train_step`` and ``make_eval_step`` close over the model, the task and
the optimizer only; they need no workdir, mesh or trainer, so a notebook or a
test can train with them directly::

    step = jax.jit(make_train_step(model, tasks.get_task("lm"), tx, schedule))
    state, metrics = step(state, batch)

The train step:

1. derives this step's dropout key as ``fold_in(state.rng, state.step)`` (so a
   resumed run draws the same keys);
2. computes the loss and its gradient, over ``grad_accum_steps`` micro-batches
   (a ``lax.scan``) when asked, normalised by the whole batch's weight so the
   sum equals the full-batch mean;
3. adds the auxiliary losses the layers sow (MoE load balancing, router z-loss);
   with a teacher (``distill``, see ``tfm.distill``), the loss mixes the hard
   cross-entropy with the soft one against the teacher's logits, computed in the
   same step; the step then takes the teacher's parameters as a third argument;
4. applies the optimizer update, and keeps the old state when the loss, the
   gradient norm or any updated parameter is not finite, so nothing NaN can
   reach a checkpoint; the ``*_finite`` metrics tell the loop why;
5. with ``ema_decay``, updates the moving average of the parameters
   (``TrainState.ema_params``, ``tfm.optim.update_ema``) that evaluation uses.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from tfm import distill as distill_lib
from tfm import optim
from tfm.fused_optim import FusedAdamW
from tfm.tasks import Task

StepFn = Callable[[Any, dict], tuple[Any, dict]]


@flax.struct.dataclass
class TrainState:
    """What a train step carries from one step to the next, and what a checkpoint saves.

    * ``step``: int32 scalar, the updates applied so far.
    * ``params``: the model's parameters (``init_fn`` returns them still boxed with their logical axes).
    * ``opt_state``: the optimizer's state for ``params``.
    * ``rng``: the base key's data (uint32[2]); step ``s`` draws its dropout key as ``fold_in(rng, s)``.
    * ``carry``: a recurrent task's state between batches (Transformer-XL's memory); None otherwise.
      It is checkpointed with the rest, so a resumed run continues with the same memory.
    * ``ema_params``: the exponential moving average of ``params`` (``optim.ema_decay``); None without one.
      Evaluation, export and warm starts take it in place of ``params`` (``eval_params``).
    """

    step: jax.Array  # int32 scalar: updates applied so far
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32[2] base key; step s uses fold_in(rng, s)
    carry: Any = None
    ema_params: Any = None

    @property
    def eval_params(self) -> Any:
        """The parameters to evaluate: the moving average where the run keeps one, else ``params``."""
        return self.params if self.ema_params is None else self.ema_params


def _aux_loss(mutated) -> jax.Array:
    """The sum of everything the layers sowed into the ``aux_loss`` collection."""
    leaves = jax.tree.leaves(mutated.get("aux_loss", {}))
    return sum((jnp.sum(x) for x in leaves), jnp.zeros((), jnp.float32))


def _moe_stats(mutated) -> dict:
    """Router statistics sown by MoE layers, averaged over layers: ``load [E]`` and ``drop_fraction``."""
    found: dict[str, list] = {"load": [], "drop_fraction": []}
    for path, leaf in jax.tree_util.tree_flatten_with_path(mutated.get("moe_stats", {}))[0]:
        names = [getattr(k, "key", None) for k in path]
        for name in found:
            if name in names:
                found[name].append(leaf.reshape(-1, leaf.shape[-1]) if name == "load" else leaf.reshape(-1))
    if not found["load"]:
        return {}
    return {
        "moe_load": jnp.concatenate(found["load"]).mean(0),
        "moe_drop_fraction": jnp.concatenate(found["drop_fraction"]).mean(),
    }


def _split_micro(batch: dict, n: int) -> dict:
    """``[n*b, ...] -> [n, b, ...]`` with micro-batch ``a`` = rows ``a, a+n, a+2n, ...``.

    Strided, not contiguous, so each micro-batch takes rows from every device's
    shard and the split moves no data between devices.
    """

    def split(x):
        b = x.shape[0] // n
        return jnp.swapaxes(x.reshape((b, n) + x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def forward(
    model: nn.Module, task: Task, params: Any, batch: dict, *, train: bool, rng: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, dict, Any]:
    """``(logits, aux_loss, moe_stats, carry)`` of the model on ``batch`` (``carry`` None unless the task is recurrent)."""
    args, kwargs = task.model_args(batch)
    rngs = {"dropout": rng} if train else {}
    out, mutated = model.apply(
        {"params": params}, *args, **kwargs, deterministic=not train, rngs=rngs, mutable=["aux_loss", "moe_stats"]
    )
    return task.logits(out), _aux_loss(mutated), _moe_stats(mutated), task.carry(out)


def make_train_step(
    model: nn.Module,
    task: Task,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    grad_accum_steps: int = 1,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    aux_loss_weight: float = 1.0,
    batch_sharding: jax.sharding.Sharding | None = None,
    distill: distill_lib.Distillation | None = None,
    ema_decay: float = 0.0,
    fused: FusedAdamW | None = None,
) -> StepFn:
    """``train_step(state, batch) -> (state, metrics)``; pure, ready for ``jax.jit``.

    ``distill``: train against a teacher; the step is then
    ``train_step(state, batch, teacher_params)`` and also reports ``distill_loss``.

    ``batch_sharding``: with gradient accumulation, each micro-batch is kept on
    the batch's sharding (the strided split moves no data between devices).

    ``ema_decay`` > 0: the state carries ``ema_params`` (``init_fn(..., ema=True)``), updated each step.

    ``fused``: ``tx``'s update, clipping and the guard as one native pass (``tfm.fused_optim``; the
    CPU with one device); the state and the result are those of ``tx``'s path, to float32 rounding.
    """
    n_micro = grad_accum_steps
    if not task.splittable and n_micro > 1:
        raise ValueError(f"task {task.name!r} {task.whole_batch_reason}; it cannot split a batch into "
                         f"grad_accum_steps={n_micro} micro-batches")  # fmt: skip

    def train_step(state: TrainState, batch: dict, teacher_params: Any = None):
        if (state.ema_params is not None) != (ema_decay > 0):
            has = "has" if state.ema_params is not None else "has no"
            raise ValueError(f"ema_decay={ema_decay} but the state {has} ema_params; "
                             "make the state with init_fn(..., ema=ema_decay > 0)")
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        if task.recurrent and state.carry is not None:  # the memory of the previous batch goes in with this one
            batch = {**batch, **state.carry}
        weight = task.total_weight(batch)
        options = dict(label_smoothing=label_smoothing, z_loss=z_loss)

        def objective(params, mb, key):
            logits, aux, stats, carry = forward(model, task, params, mb, train=True, rng=key)
            if distill is None:
                sums = task.loss_sums(logits, mb, **options)
                total = sums["loss_sum"]
            else:
                teacher_logits, *_ = forward(distill.teacher, task, teacher_params, mb, train=False)
                sums = distill_lib.loss_sums(distill, task, logits, teacher_logits, mb, **options)
                total = sums.pop("objective_sum")
            # Normalised by the whole batch's weight so micro-batches add up to the full-batch mean.
            return total / weight + aux_loss_weight * aux / n_micro, (sums, aux, stats, carry)

        grad_fn = jax.value_and_grad(objective, has_aux=True)
        if n_micro == 1:
            (_, (sums, aux, stats, carry)), grads = grad_fn(state.params, batch, rng)
        else:
            micro = _split_micro(batch, n_micro)

            def body(acc, xs):
                mb, i = xs
                if batch_sharding is not None:
                    mb = jax.lax.with_sharding_constraint(mb, batch_sharding)
                (_, (s, a, st, _)), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, acc, (g, s, a, st)), None

            first = jax.tree.map(lambda x: x[0], micro)
            (_, (s0, a0, st0, _)), _ = jax.eval_shape(grad_fn, state.params, first, rng)
            carry = state.carry  # non-recurrent tasks only (refused above): nothing to carry
            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (state.params, s0, a0, st0))
            (grads, sums, aux, stats), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(n_micro)))
            aux = aux / n_micro
            stats = jax.tree.map(lambda x: x / n_micro, stats)

        grad_norm = optax.tree.norm(grads)
        loss = sums["loss_sum"] / sums["weight_sum"]
        loss_ok, grads_ok = jnp.isfinite(loss) & jnp.isfinite(aux), jnp.isfinite(grad_norm)
        if fused is not None and fused.supports(state.params, state.opt_state):
            # The kernel keeps the old parameters and moments itself on a refused step; the rest is selected here.
            params, opt_state, params_ok = fused.update(grads, grad_norm, state.params, state.opt_state,
                                                        loss_ok & grads_ok)  # fmt: skip
            ok = loss_ok & grads_ok & params_ok
            kept = jax.tree.map(lambda a, b: jnp.where(ok, a, b), (state.step + 1, carry), (state.step, state.carry))
            new = TrainState(step=kept[0], params=params, opt_state=opt_state, rng=state.rng, carry=kept[1],
                             ema_params=state.ema_params)  # fmt: skip
        else:
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            # Finite gradients can still give non-finite parameters (an overflowing learning rate or decay).
            params_ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
            ok = loss_ok & grads_ok & params_ok
            new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng, carry=carry,
                             ema_params=state.ema_params)  # fmt: skip
            # A non-finite step changes nothing, so no NaN can reach a checkpoint.
            new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state)
        if state.ema_params is not None:  # from the kept parameters; a refused step leaves it as it was
            new = new.replace(ema_params=optim.update_ema(state.ema_params, new.params, state.step, ema_decay, ok))
        metrics = {
            "loss": loss,
            "accuracy": sums["correct"] / sums["weight_sum"],
            "aux_loss": aux,
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "weight": sums["weight_sum"],
            "loss_finite": loss_ok,
            "grads_finite": grads_ok,
            "params_finite": params_ok,
            **stats,  # MoE router statistics, if the model has MoE layers
        }
        if "distill_sum" in sums:
            metrics["distill_loss"] = sums["distill_sum"] / sums["weight_sum"]
        return new, metrics

    return train_step


def make_eval_step(model: nn.Module, task: Task, flip: bool = False) -> Callable[[Any, dict], dict]:
    """``eval_step(params, batch) -> sums`` (no label smoothing, no dropout); pure, ready for ``jax.jit``.

    A recurrent task's step is ``eval_step(params, batch, carry) -> (sums, carry)``.
    ``flip`` (image classification): the prediction is the mean of the class probabilities of each
    image and of its left-right mirror (test-time augmentation); the loss is that mean's.
    """
    if flip and task.name != "classify":
        raise ValueError(f"flip test-time augmentation needs an image classification run (task 'classify'), "
                         f"not task {task.name!r}")  # fmt: skip

    def eval_step(params, batch: dict, carry: Any = None):
        if task.recurrent and carry is not None:
            batch = {**batch, **carry}
        logits, _, _, new_carry = forward(model, task, params, batch, train=False)
        if flip:  # inputs [B, H, W, C]: W is the left-right axis
            mirrored, *_ = forward(model, task, params, {**batch, "inputs": batch["inputs"][:, :, ::-1]}, train=False)
            # log((p + p_mirrored) / 2): log-probabilities, which the loss's softmax leaves unchanged
            logits = jnp.logaddexp(jax.nn.log_softmax(logits), jax.nn.log_softmax(mirrored)) - jnp.log(2.0)
        sums = task.loss_sums(logits, batch)
        return (sums, new_carry) if task.recurrent else sums

    return eval_step


def init_fn(model: nn.Module, task: Task, tx: optax.GradientTransformation, example: dict, rows: int = 1,
            ema: bool = False) -> Callable:  # fmt: skip
    """``init(key) -> TrainState`` (parameters still boxed with their logical axes) for batches like ``example``;
    a recurrent task's carry is made for batches of ``rows`` rows; ``ema``: the state carries a moving average
    of the parameters, which starts as the parameters."""

    def init(key) -> TrainState:
        params_key, dropout_key = jax.random.split(key)
        args, kwargs = task.model_args({k: jnp.asarray(v) for k, v in example.items()})
        params = model.init({"params": params_key}, *args, **kwargs)["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=jax.random.key_data(dropout_key),
            carry=task.init_carry(model.config, rows),
            ema_params=jax.tree.map(jnp.copy, params) if ema else None,  # boxed like params: sharded alike
        )

    return init


__all__ = ["TrainState", "forward", "init_fn", "make_eval_step", "make_train_step"]
