"""Knowledge distillation (Hinton, Vinyals & Dean 2015): a student trained on a teacher's softened outputs.

With student logits ``z_s``, teacher logits ``z_t``, temperature ``T`` and weight ``alpha``::

    loss = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y)

The ``T^2`` keeps the soft term's gradient on the scale of the hard one as ``T`` grows
(section 2 of the paper). Both terms are summed over the positions (or examples) that
count, with the task's weights, and normalised like the cross-entropy.

The train step (``tfm.step``) computes the teacher's logits in the same jitted step,
in evaluation mode and under ``stop_gradient``, so nothing of the teacher changes;
``tfm.teacher`` loads the teacher a run config names.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from tfm.tasks import Task


@dataclasses.dataclass(frozen=True)
class Distillation:
    """The teacher's module and the loss's two numbers; the teacher's parameters travel as a step argument."""

    teacher: nn.Module
    alpha: float = 0.5
    temperature: float = 2.0


def soft_loss_sum(student_logits: jax.Array, teacher_logits: jax.Array, weights: jax.Array, temperature: float) -> jax.Array:
    """``T^2 * sum_i w_i * KL(softmax(z_t,i / T) || softmax(z_s,i / T))`` over ``logits [..., V]``, ``weights [...]``."""
    t = temperature
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return t * t * jnp.sum(kl * weights.astype(jnp.float32))


def task_weights(task: Task, batch: dict) -> jax.Array:
    """The weights the task's cross-entropy uses: ``batch["weights"]``, else one per target."""
    targets = batch[task.target_key]
    return batch.get("weights", jnp.ones(targets.shape, jnp.float32))


def loss_sums(distill: Distillation, task: Task, student_logits, teacher_logits, batch: dict, **ce_options) -> dict:
    """The task's sums plus ``distill_sum`` (the soft term), with ``objective_sum`` the weighted mix to minimise.

    ``loss_sum`` stays the hard cross-entropy, so the logged loss means what it means without a teacher.
    """
    sums = task.loss_sums(student_logits, batch, **ce_options)
    soft = soft_loss_sum(student_logits, jax.lax.stop_gradient(teacher_logits), task_weights(task, batch),
                         distill.temperature)  # fmt: skip
    mixed = distill.alpha * soft + (1.0 - distill.alpha) * sums["loss_sum"]
    return {**sums, "distill_sum": soft, "objective_sum": mixed}


__all__ = ["Distillation", "loss_sums", "soft_loss_sum", "task_weights"]
