"""Tasks: what a batch means to a model, its loss, its metrics and its cost.

A preset names its task (``Preset.task``); the trainer, the metrics and the
evaluation ask the task, never the model family. A task provides:

* ``model_args(batch)``: the positional and keyword arguments of the model's
  ``__call__`` for a batch (the keys each dataset yields are listed in ``tfm.data``);
* ``loss_sums(logits, batch)``: sums over the batch (loss, weight, correct), so
  micro-batches and devices add up exactly;
* ``flops_per_step(config, params, shapes)``: training FLOPs of one step (for MFU),
  counting only the experts a token is routed to in MoE layers;
* ``unit`` / ``target_key``: what a step processes (``"tok"`` or ``"ex"``) and the
  batch key that counts them;
* ``logits(out)`` / ``carry(out)``: the model's output split into its logits and, for a
  ``recurrent`` task, the state handed to the next batch (``init_carry`` makes the first).

To add a task: subclass ``Task``, register an instance in ``TASKS``, and name it
in the presets whose models it trains. A dataset states the task its batches
serve (``Dataset.task``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from tfm.optim import cross_entropy, token_cross_entropy

if TYPE_CHECKING:
    from tfm.models.common import ModelConfig

Batch = Mapping[str, Any]


def _count(params, name: str, mcfg) -> float:
    """Parameters of the sub-tree ``name`` that one token meets: MoE expert weights count ``top_k / E``."""
    experts = mcfg.block.num_experts
    active = mcfg.block.experts_per_token / experts if experts else 1.0
    total = 0.0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params.get(name, {}))[0]:
        keys = [str(getattr(k, "key", "")) for k in path]
        routed = "moe" in keys and any(k.startswith(("wi", "wo")) for k in keys)
        total += int(np.prod(leaf.shape)) * (active if routed else 1.0)
    return total


def _stem_flops(widths, side: int, channels: int) -> tuple[float, int, int]:
    """``(forward FLOPs per image, output side, output channels)`` of 3x3 stride-2 SAME convolutions."""
    flops = 0.0
    for width in map(int, widths):
        side = -(-side // 2)
        flops, channels = flops + 2 * 9 * channels * width * side * side, width
    return flops, side, channels


class Task:
    """The interface; subclasses set the name and fill in the FLOP count (and model arguments beyond ``inputs``)."""

    name: str = ""
    unit: str = "tok"  # what tokens/s or examples/s counts
    target_key: str = "targets"
    token_level: bool = True  # a per-token loss: evaluation also reports perplexity

    recurrent: bool = False  # a state (``carry``) goes from each batch to the next, in training and evaluation
    whole_batch_reason: str = ""  # why a batch cannot be split into micro-batches, if it cannot

    @property
    def splittable(self) -> bool:
        """Whether gradient accumulation may split a batch (and leave the loss as it is)."""
        return not self.whole_batch_reason

    def model_args(self, batch: Batch) -> tuple[tuple, dict]:
        """The model's positional and keyword arguments; by default the one input ``inputs``."""
        return (batch["inputs"],), {}

    def logits(self, out: Any) -> jax.Array:
        """The logits in what the model returns (all of it, by default)."""
        return out

    def carry(self, out: Any) -> Any:
        """What a recurrent task hands from this batch to the next; None for the others."""
        return None

    def init_carry(self, mcfg: ModelConfig, rows: int) -> Any:
        """The carry before the first batch, for ``rows`` rows (recurrent tasks)."""
        return None

    def loss_sums(self, logits: jax.Array, batch: Batch, *, label_smoothing: float = 0.0, z_loss: float = 0.0) -> dict:
        """``loss_sum``, ``weight_sum`` (targets that count) and ``correct`` (argmax hits; ties count), summed over the batch."""
        targets = batch[self.target_key]
        weights = batch.get("weights", jnp.ones(targets.shape, jnp.float32))
        loss, hit = token_cross_entropy(logits, targets, label_smoothing=label_smoothing, z_loss=z_loss)
        weights = weights.astype(jnp.float32)
        return {"loss_sum": jnp.sum(loss * weights), "weight_sum": jnp.sum(weights), "correct": jnp.sum(hit * weights)}

    def total_weight(self, batch: Batch) -> jax.Array:
        """The batch's ``weight_sum`` before any forward pass: micro-batch losses are normalised by it."""
        if "weights" in batch:
            return jnp.sum(batch["weights"].astype(jnp.float32))
        return jnp.asarray(batch[self.target_key].size, jnp.float32)

    def units(self, shapes: Mapping[str, tuple]) -> float:
        """Tokens (or examples) one step of these batch shapes processes."""
        return float(np.prod(shapes[self.target_key]))

    def flops_per_step(self, mcfg: ModelConfig, params: Any, shapes: Mapping[str, tuple]) -> float:
        """Training FLOPs (forward + backward = 3 x forward) of one step; NaN where unknown."""
        return float("nan")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LanguageModeling(Task):
    """Next-token prediction with a decoder-only model: ``inputs``, ``targets`` (and packing keys)."""

    name = "lm"

    def model_args(self, batch: Batch) -> tuple[tuple, dict]:
        return (batch["inputs"],), {k: batch[k] for k in ("segment_ids", "positions") if k in batch}

    def flops_per_step(self, mcfg: ModelConfig, params: Any, shapes: Mapping[str, tuple]) -> float:
        # PaLM appendix B: 2 FLOPs per weight per token (the output projection counts even when
        # tied), plus 4 T D per layer for the attention scores and values over the full T.
        b, t = shapes["inputs"]
        n = _count(params, "decoder", mcfg) + mcfg.vocab_size * mcfg.block.d_model
        return 3.0 * (2 * n * b * t + 4 * mcfg.num_layers * t * mcfg.block.d_model * b * t)


class SegmentLanguageModeling(LanguageModeling):
    """Next-token prediction over consecutive segments with a memory (Transformer-XL, ``tfm.models.transformer_xl``).

    Batches come from a ``contiguous`` dataset: each row continues the previous batch's row, and
    ``reset [B]`` marks rows that start over. The carry is the model's memory ``[L, B, M, D]`` and
    its mask ``[B, M]``; a reset row's memory is masked out, so nothing crosses a stream's end.
    """

    name = "lm_memory"
    recurrent = True
    whole_batch_reason = "carries a memory from batch to batch"

    def model_args(self, batch: Batch) -> tuple[tuple, dict]:
        memory, mask = batch.get("memory"), batch.get("memory_mask")
        if mask is not None and "reset" in batch:
            mask = mask & ~batch["reset"][:, None]
        return (batch["inputs"], memory, mask), {}

    def logits(self, out: Any) -> jax.Array:
        return out[0]

    def carry(self, out: Any) -> Any:
        if out[1].shape[2] == 0:  # no memory slots: nothing to carry (and nothing a checkpoint could hold)
            return None
        return {"memory": out[1], "memory_mask": out[2]}

    def init_carry(self, mcfg: ModelConfig, rows: int) -> Any:
        from flax import linen as nn

        if mcfg.memory_len == 0:
            return None

        shape = (mcfg.num_layers, rows, mcfg.memory_len, mcfg.block.d_model)
        memory = nn.LogicallyPartitioned(jnp.zeros(shape, mcfg.block.dtype), (None, "batch", None, "embed"))
        return {"memory": memory, "memory_mask": nn.LogicallyPartitioned(jnp.zeros(shape[1:3], bool), ("batch", None))}

    def flops_per_step(self, mcfg: ModelConfig, params: Any, shapes: Mapping[str, tuple]) -> float:
        # As LanguageModeling, with each query scoring M memory keys too (and the relative term as many again).
        b, t = shapes["inputs"]
        n = sum(_count(params, f"layer_{i}", mcfg) for i in range(mcfg.num_layers)) + mcfg.vocab_size * mcfg.block.d_model
        s = t + mcfg.memory_len
        return 3.0 * (2 * n * b * t + 6 * mcfg.num_layers * s * mcfg.block.d_model * b * t)


class Seq2Seq(Task):
    """Encoder–decoder: ``inputs`` (source), ``decoder_inputs``, ``targets`` (and packing keys)."""

    name = "seq2seq"
    PACKING = {"segment_ids": "src_segment_ids", "decoder_segment_ids": "tgt_segment_ids",
               "positions": "src_positions", "decoder_positions": "tgt_positions"}  # fmt: skip

    def model_args(self, batch: Batch) -> tuple[tuple, dict]:
        kwargs = {v: batch[k] for k, v in self.PACKING.items() if k in batch}
        return (batch["inputs"], batch["decoder_inputs"]), kwargs

    def flops_per_step(self, mcfg: ModelConfig, params: Any, shapes: Mapping[str, tuple]) -> float:
        b, s = shapes["inputs"]
        _, t = shapes["decoder_inputs"]
        vocab = getattr(mcfg, "tgt_vocab", mcfg.vocab_size)
        le = getattr(mcfg, "num_encoder_layers", None) or mcfg.num_layers
        ld = getattr(mcfg, "num_decoder_layers", None) or mcfg.num_layers
        d = mcfg.block.d_model
        fwd = 2 * _count(params, "encoder", mcfg) * b * s + 4 * le * s * d * b * s
        fwd += 2 * (_count(params, "decoder", mcfg) + vocab * d) * b * t + 4 * ld * (t + s) * d * b * t
        return 3.0 * fwd


class SpeechRecognition(Seq2Seq):
    """Audio -> transcript (Whisper): ``inputs [B, F, M]`` log-mel frames, ``decoder_inputs``, ``targets``, ``weights``."""

    name = "speech"
    PACKING = {}

    def flops_per_step(self, mcfg: ModelConfig, params: Any, shapes: Mapping[str, tuple]) -> float:
        b, f, m = shapes["inputs"]
        _, t = shapes["decoder_inputs"]
        s, d = f // 2, mcfg.block.d_model
        stem = 2 * 3 * d * (m * f + d * s) * b  # conv1 at the frame rate, conv2 at half of it
        fwd = stem + 2 * _count(params, "encoder", mcfg) * b * s + 4 * mcfg.num_encoder_layers * s * d * b * s
        fwd += 2 * (_count(params, "decoder", mcfg) + mcfg.vocab_size * d) * b * t
        fwd += 4 * mcfg.num_decoder_layers * (t + s) * d * b * t
        return 3.0 * fwd


class _Classification(Task):
    """One label per example: ``labels [B]`` (and ``weights [B]``); the loss is per example."""

    unit = "ex"
    target_key = "labels"
    token_level = False


class ImageClassification(_Classification):
    """One label per image: ``inputs [B, H, W, C]``, ``labels [B]``."""

    name = "classify"

    def flops_per_step(self, mcfg: ModelConfig, params: Any, shapes: Mapping[str, tuple]) -> float:
        b = shapes["inputs"][0]
        stem, _, c = _stem_flops(mcfg.stem_channels, mcfg.image_size, mcfg.num_channels)
        p, d = mcfg.num_patches, mcfg.block.d_model  # patches of the stem's feature map (or of the image)
        t = p + 1  # and the class token
        fwd = stem + 2 * mcfg.patch_size**2 * c * d * p + 2 * _count(params, "encoder", mcfg) * t
        fwd += 4 * mcfg.num_layers * t * t * d + 2 * d * mcfg.num_classes  # attention; the head, once per image
        return 3.0 * b * fwd


def _encoder_flops(mcfg, params, shapes, head: float) -> float:
    """A BERT-style encoder over ``inputs [B, T]`` plus ``head`` weights met per token."""
    b, t = shapes["inputs"]
    n = _count(params.get("bert", {}), "encoder", mcfg) + head
    return 3.0 * (2 * n * b * t + 4 * mcfg.num_layers * t * mcfg.block.d_model * b * t)


class MaskedLanguageModeling(Task):
    """BERT's masked LM: ``inputs`` (with ``[MASK]``s), ``targets`` (the original ids), ``weights`` (1 where masked)."""

    name = "mlm"

    def units(self, shapes: Mapping[str, tuple]) -> float:
        return float(np.prod(shapes["inputs"]))

    def flops_per_step(self, mcfg: ModelConfig, params: Any, shapes: Mapping[str, tuple]) -> float:
        # The MLM transform and the (tied) output layer run at every position, as they do here.
        return _encoder_flops(mcfg, params, shapes, mcfg.block.d_model * mcfg.block.d_model + mcfg.vocab_size * mcfg.block.d_model)


class TextClassification(_Classification):
    """One label per token sequence (the ``[CLS]`` vector): ``inputs [B, T]``, ``labels [B]``, ``weights [B]``."""

    name = "text_classify"

    def flops_per_step(self, mcfg: ModelConfig, params: Any, shapes: Mapping[str, tuple]) -> float:
        b, t = shapes["inputs"]
        # The pooler and classifier run once per sequence, not per token.
        per_seq = 3.0 * 2 * b * (mcfg.block.d_model * mcfg.block.d_model + mcfg.block.d_model * mcfg.num_labels)
        return _encoder_flops(mcfg, params, shapes, 0.0) + per_seq


class Contrastive(Task):
    """CLIP's image–text contrast: ``inputs [B, H, W, C]`` (images), ``tokens [B, T]`` (their captions).

    The logits ``[B, B]`` are ``scale · I Tᵀ`` over the whole global batch (under ``jit`` a
    sharded batch is gathered by XLA, so every device's images meet every device's texts); the
    loss is the symmetric cross-entropy ``(CE(rows) + CE(columns)) / 2`` with the diagonal as
    targets, and ``correct`` counts the top-1 retrievals, image to text and back, halved.
    """

    name = "contrastive"
    unit = "ex"
    target_key = "inputs"
    token_level = False
    whole_batch_reason = "contrasts each example with the rest of its batch"

    def model_args(self, batch: Batch) -> tuple[tuple, dict]:
        return (batch["inputs"], batch["tokens"]), {}

    def logits(self, out: Any) -> jax.Array:
        image, text, scale = out
        return scale * jnp.einsum("be,ce->bc", image, text)

    def loss_sums(self, logits: jax.Array, batch: Batch, *, label_smoothing: float = 0.0, z_loss: float = 0.0) -> dict:
        b = logits.shape[0]
        weights = batch.get("weights", jnp.ones((b,), jnp.float32)).astype(jnp.float32)
        # A zero-weight row (an evaluation split's padding) is neither a query nor a candidate.
        logits = jnp.where((weights[:, None] > 0) & (weights[None, :] > 0), logits, jnp.finfo(logits.dtype).min)
        targets = jnp.arange(b)
        rows, n = cross_entropy(logits, targets, weights, label_smoothing=label_smoothing, z_loss=z_loss)
        columns, _ = cross_entropy(logits.T, targets, weights, label_smoothing=label_smoothing, z_loss=z_loss)
        hits = (jnp.argmax(logits, -1) == targets).astype(jnp.float32) + (jnp.argmax(logits, 0) == targets)
        return {"loss_sum": (rows + columns) / 2, "weight_sum": n, "correct": jnp.sum(hits * weights) / 2}

    def total_weight(self, batch: Batch) -> jax.Array:
        return super().total_weight(batch) if "weights" in batch else jnp.asarray(batch["inputs"].shape[0], jnp.float32)

    def units(self, shapes: Mapping[str, tuple]) -> float:
        return float(shapes["inputs"][0])

    def flops_per_step(self, mcfg: ModelConfig, params: Any, shapes: Mapping[str, tuple]) -> float:
        b, (_, t) = shapes["inputs"][0], shapes["tokens"]
        p = mcfg.num_patches + 1
        vision = _count(params.get("image_tower", {}), "encoder", mcfg) + mcfg.patch_size**2 * mcfg.num_channels * mcfg.vision_d_model
        text = _count(params.get("text_tower", {}), "encoder", mcfg)
        fwd = 2 * b * (vision * p + text * t) + 4 * b * (mcfg.vision_layers * p * p * mcfg.vision_d_model
                                                          + mcfg.text_layers * t * t * mcfg.block.d_model)  # fmt: skip
        return 3.0 * (fwd + 2 * b * b * mcfg.embed_dim)


class MultimodalClassification(_Classification):
    """One label per example from any subset of ``text``, ``images``, ``audio`` (``tfm.models.fusion``)."""

    name = "multimodal"
    KEYS = ("text", "images", "audio", "text_present", "images_present", "audio_present")

    def model_args(self, batch: Batch) -> tuple[tuple, dict]:
        return (), {k: batch[k] for k in self.KEYS if k in batch}

    def flops_per_step(self, mcfg: ModelConfig, params: Any, shapes: Mapping[str, tuple]) -> float:
        b, d = shapes["labels"][0], mcfg.block.d_model
        lengths = {"text": shapes.get("text", (0, 0))[1], "images": (mcfg.image_size // mcfg.patch_size) ** 2,
                   "audio": shapes.get("audio", (0, 0))[1] // 2}  # fmt: skip
        stacks = {"text": ("text_encoder", mcfg.text_layers), "images": ("image_encoder", mcfg.image_layers),
                  "audio": ("audio_encoder", mcfg.audio_layers)}  # fmt: skip
        fwd, fused = 0.0, 1  # the FUSE token
        for key in (k for k in stacks if k in shapes):
            (stack, layers), t = stacks[key], lengths[key]
            fwd, fused = fwd + 2 * _count(params, stack, mcfg) * t + 4 * layers * t * t * d, fused + t
        fwd += 2 * _count(params, "fusion", mcfg) * fused + 4 * mcfg.fusion_layers * fused * fused * d
        return 3.0 * b * fwd


class Detection(Task):
    """DETR's set prediction: ``inputs [B, H, W, C]``, ``boxes [B, M, 4]`` (cx, cy, w, h in [0, 1]),
    ``labels [B, M]``, ``box_mask [B, M]`` (1 for a real box), ``weights [B]`` (0 for padding images).

    The model returns ``(class_logits [B, Q, C + 1], boxes [B, Q, 4])``; the loss is
    ``tfm.detection.set_loss`` after the Hungarian matching, per target box; ``correct`` counts
    the target boxes whose matched query names their class.
    """

    name = "detect"
    unit = "ex"
    target_key = "labels"
    token_level = False

    def loss_sums(self, logits: Any, batch: Batch, *, label_smoothing: float = 0.0, z_loss: float = 0.0) -> dict:
        from tfm.detection import set_loss

        class_logits, boxes = logits
        return set_loss(class_logits, boxes, batch["labels"], batch["boxes"], batch["box_mask"], batch.get("weights"))

    def total_weight(self, batch: Batch) -> jax.Array:
        mask = batch["box_mask"].astype(jnp.float32)
        if "weights" in batch:
            mask = mask * batch["weights"].astype(jnp.float32)[:, None]
        return jnp.sum(mask)

    def units(self, shapes: Mapping[str, tuple]) -> float:
        return float(shapes["inputs"][0])

    def flops_per_step(self, mcfg: ModelConfig, params: Any, shapes: Mapping[str, tuple]) -> float:
        b, size, _, c = shapes["inputs"]
        stem, side, c = _stem_flops(mcfg.stem_channels, size, c)
        s, q, d = side * side, mcfg.num_queries, mcfg.block.d_model
        fwd = stem + 2 * c * d * s + 2 * _count(params, "encoder", mcfg) * s + 4 * mcfg.num_encoder_layers * s * s * d
        fwd += 2 * _count(params, "decoder", mcfg) * q + 4 * mcfg.num_decoder_layers * (q + s) * q * d
        fwd += 2 * q * d * (mcfg.num_classes + 1 + 2 * d + 4)
        return 3.0 * b * fwd


TASKS: dict[str, Task] = {task.name: task for task in (
    LanguageModeling(), SegmentLanguageModeling(), Seq2Seq(), SpeechRecognition(), ImageClassification(),
    MaskedLanguageModeling(), TextClassification(), Contrastive(), Detection(), MultimodalClassification())}  # fmt: skip


def get_task(name: str | Task) -> Task:
    """The registered task called ``name`` (a ``Task`` is returned as it is)."""
    if isinstance(name, Task):
        return name
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; registered: {sorted(TASKS)}")
    return TASKS[name]


__all__ = ["Contrastive", "Detection", "ImageClassification", "LanguageModeling", "MaskedLanguageModeling", "MultimodalClassification", "Seq2Seq", "SegmentLanguageModeling",
           "SpeechRecognition", "TASKS", "Task", "TextClassification", "get_task"]  # fmt: skip
