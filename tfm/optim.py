"""Learning-rate schedules, optimizers and the token loss — thin layers over optax.

* ``noam_schedule``: the paper's schedule (§5.3), exactly.
* ``warmup_schedule``: linear warmup then cosine, linear or rsqrt decay.
* ``make_optimizer``: Adam/AdamW (paper betas and epsilon available), global-norm
  clipping, weight decay masked off norms and biases.
* ``update_ema``: an exponential moving average of the parameters, for evaluation.
* ``cross_entropy``: token cross-entropy with label smoothing (§5.4), padding
  weights and an optional z-loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax
from jax import Array

if TYPE_CHECKING:
    from ml_collections import ConfigDict

# Paper §5.3: Adam with beta1 = 0.9, beta2 = 0.98, eps = 1e-9.
PAPER_ADAM = dict(b1=0.9, b2=0.98, eps=1e-9)


def noam_schedule(d_model: int, warmup_steps: int, scale: float = 1.0) -> optax.Schedule:
    """lr = scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5), step counted from 1 (§5.3).

    optax counts updates from 0, so the optimizer's count c is the paper's step c + 1.
    The peak, ``scale * (d_model * warmup)^-0.5``, is reached at step = warmup.
    """
    if d_model < 1 or warmup_steps < 1:
        raise ValueError(f"noam_schedule needs d_model >= 1 and warmup_steps >= 1, got {d_model}, {warmup_steps}")

    def schedule(count):
        step = jnp.asarray(count, jnp.float32) + 1.0
        return scale * d_model**-0.5 * jnp.minimum(step**-0.5, step * warmup_steps**-1.5)

    return schedule


DECAYS = ("cosine", "linear", "rsqrt", "constant")


def warmup_schedule(
    peak: float, warmup_steps: int, total_steps: int, decay: str = "cosine", end_fraction: float = 0.0
) -> optax.Schedule:
    """Linear warmup from 0 to ``peak`` over ``warmup_steps``, then ``decay`` until ``total_steps``.

    ``cosine`` and ``linear`` end at ``peak * end_fraction``; ``rsqrt`` is
    ``peak * sqrt(warmup / step)``; ``constant`` stays at ``peak``.
    """
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
    if warmup_steps < 0 or total_steps < warmup_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps, got {warmup_steps}, {total_steps}")
    warmup = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
    rest = max(total_steps - warmup_steps, 1)
    if decay == "cosine":
        after = optax.cosine_decay_schedule(peak, rest, alpha=end_fraction)
    elif decay == "linear":
        after = optax.linear_schedule(peak, peak * end_fraction, rest)
    elif decay == "rsqrt":
        w = max(warmup_steps, 1)
        after = lambda c: peak * jnp.sqrt(w / (jnp.asarray(c, jnp.float32) + w))  # noqa: E731
    else:
        after = optax.constant_schedule(peak)
    if warmup_steps == 0:
        return after
    return optax.join_schedules([warmup, after], [warmup_steps])


def make_schedule(optim_cfg: ConfigDict, d_model: int, total_steps: int) -> optax.Schedule:
    """The learning-rate schedule the ``optim`` config section names."""
    o = optim_cfg
    if o.schedule == "noam":
        return noam_schedule(d_model, o.warmup_steps, o.noam_scale)
    # A run shorter than its warmup (a quick check of a recipe) simply ends during the warmup.
    return warmup_schedule(o.learning_rate, o.warmup_steps, max(total_steps, o.warmup_steps), o.schedule, o.end_fraction)


def decay_mask(params: Any) -> object:
    """True for weight matrices and embeddings, False for biases and norm scales.

    Decided by the parameter's name, not its rank: under ``nn.scan`` a bias
    carries a layer axis and is two-dimensional.
    """

    def is_decayed(path, _):
        # The last dictionary key is the parameter's name; boxed (``nn.Partitioned``)
        # parameters add an attribute step after it.
        keys = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
        return bool(keys) and keys[-1] in ("kernel", "embedding")

    return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(
    learning_rate: float | optax.Schedule,
    *,
    name: str = "adamw",
    b1: float = 0.9,
    b2: float = 0.98,
    eps: float = 1e-9,
    weight_decay: float = 0.0,
    clip_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """Adam (``name="adam"``) or AdamW with global-norm clipping; defaults are the paper's betas/eps."""
    if name == "adam":
        if weight_decay:
            raise ValueError("weight_decay needs name='adamw' (Adam's L2 and decoupled decay differ)")
        opt = optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
    elif name == "adamw":
        opt = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    else:
        raise ValueError(f"optimizer name must be 'adam' or 'adamw', got {name!r}")
    if clip_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(clip_norm), opt)
    return opt


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
    """The moving average's decay after ``step`` earlier updates: ``min(decay, (1 + step) / (10 + step))``.

    Early on the average follows the parameters closely and forgets their random start
    (as ``tf.train.ExponentialMovingAverage`` with ``num_updates``); from step
    ``(10 decay - 1) / (1 - decay)`` on it is ``decay`` (8,990 steps for 0.999).
    """
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def update_ema(ema: Any, params: Any, step: jax.Array, decay: float, apply: jax.Array | bool = True) -> Any:
    """``ema + (1 - d) (params - ema)`` per leaf with ``d = ema_decay_at(step, decay)``; ``params``: the new ones.

    ``apply`` False (a traced bool): ``d = 1``, so the average stays exactly as it is, without a
    select over it (``params`` must then be finite: a refused step's kept parameters).

    Evaluating the average of the recent parameters rather than the last ones smooths out
    the noise of the final updates (Polyak & Juditsky 1992; the EMA of the ViT/DeiT recipes).
    """
    if not 0.0 < decay < 1.0:
        raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
    d = jnp.where(apply, ema_decay_at(step, decay), 1.0)
    return jax.tree.map(lambda e, p: e + ((1.0 - d) * (p - e)).astype(e.dtype), ema, params)


def token_cross_entropy(
    logits: Array, targets: Array, *, label_smoothing: float = 0.0, z_loss: float = 0.0
) -> tuple[Array, Array]:
    """Per-token cross-entropy and hits: ``logits [..., V]``, ``targets [...]`` -> ``(loss [...], hit [...])``.

    ``hit`` is True where the target's logit is the largest (argmax accuracy; a tie for the
    maximum counts as a hit). It reuses the softmax's max instead of a separate argmax, a
    variadic reduction that costs as much as the loss itself on a CPU at V = 4,000. The loss
    is defined as in ``cross_entropy``; computed in float32.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {logits.shape} and targets {targets.shape} disagree on the leading axes")
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    # -sum_v label_v log_softmax(z)_v with sum_v label_v = 1, written so that neither the one-hot
    # labels nor the log-probabilities are materialised as [..., V] arrays (the compare against the
    # iota fuses into the reduction, forward and backward): logsumexp(z) - (1 - eps) z_target - eps mean(z).
    zmax = jnp.max(logits, axis=-1)
    shift = jax.lax.stop_gradient(jnp.where(jnp.isfinite(zmax), zmax, 0.0))  # as jax.nn.logsumexp
    lse = shift + jnp.log(jnp.sum(jnp.exp(logits - shift[..., None]), axis=-1))
    target_logit = jnp.sum(jnp.where(jnp.arange(vocab) == targets[..., None], logits, 0.0), axis=-1)
    loss = lse - (1.0 - label_smoothing) * target_logit
    if label_smoothing:
        loss = loss - (label_smoothing / vocab) * jnp.sum(logits, axis=-1)
    if z_loss:
        loss = loss + z_loss * jnp.square(lse)
    return loss, target_logit >= zmax


def cross_entropy(
    logits: Array, targets: Array, weights: Array | None = None, *, label_smoothing: float = 0.0, z_loss: float = 0.0
) -> tuple[Array, Array]:
    """Weighted token cross-entropy: ``logits [..., V]``, ``targets [...]`` -> ``(loss_sum, weight_sum)``.

    The target distribution is ``(1 - eps) * one_hot + eps / V`` (§5.4,
    Szegedy et al. 2016; the same definition as ``torch.nn.CrossEntropyLoss``).
    ``weights`` zero out padding. ``z_loss`` adds ``z_loss * logsumexp(logits)^2``
    per token (PaLM), keeping the softmax normaliser near 1. Computed in float32.
    Divide the two sums for the mean, after summing them over micro-batches or devices.
    """
    loss, _ = token_cross_entropy(logits, targets, label_smoothing=label_smoothing, z_loss=z_loss)
    weights = jnp.ones_like(loss) if weights is None else weights.astype(jnp.float32)
    return jnp.sum(loss * weights), jnp.sum(weights)
