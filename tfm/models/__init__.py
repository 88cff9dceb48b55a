"""Model families, each a thin composition of ``tfm.layers``, with named presets.

``PRESETS`` maps a preset name to a ``Preset``: the config, the module that
the parameter count refers to, and example inputs for ``init`` (shapes only,
so ``jax.eval_shape`` builds even the full-size presets without memory).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from tfm.models.bert import (
    BertConfig,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertModel,
    bert_base,
    bert_base_qa,
    bert_tiny,
    bert_tiny_qa,
)  # fmt: skip
from tfm.models.clip import CLIP, CLIPConfig, clip_tiny, clip_vit_b32
from tfm.models.common import count_params
from tfm.models.detr import DETR, DETRConfig, detr_small, detr_tiny
from tfm.models.fusion import Fusion, FusionConfig, fusion_tiny
from tfm.models.gpt import GPT, GPTConfig, gpt2_small, gpt_moe_tiny, gpt_tiny, llama_tiny, mixtral_8x7b
from tfm.models.t5 import T5, T5Config, t5_small, t5_tiny
from tfm.models.transformer import (
    Transformer,
    TransformerConfig,
    transformer_base,
    transformer_big,
    transformer_moe_tiny,
    transformer_tiny,
)  # fmt: skip
from tfm.models.transformer_xl import (
    TransformerXL,
    TransformerXLConfig,
    compressive_transformer_tiny,
    transformer_xl_tiny,
)
from tfm.models.vit import ViT, ViTConfig, vit_b16, vit_tiny
from tfm.models.whisper import Whisper, WhisperConfig, whisper_micro, whisper_tiny


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named model: a family's config, the module built from it, example inputs and the task that trains it.

    * ``name``: the key in ``PRESETS``.
    * ``config``: the family's frozen config (a ``tfm.models.common.ModelConfig``).
    * ``model_cls``: the module, built as ``model_cls(config)``; the parameter count refers to it.
    * ``example_inputs``: ``config ->`` the positional arguments of ``init`` / ``apply`` (only their shapes matter).
    * ``task``: the name in ``tfm.tasks.TASKS`` that trains it; None: not trainable yet.
    """

    name: str
    config: Any
    model_cls: type[nn.Module]
    example_inputs: Callable[[Any], tuple]  # config -> positional args of init/apply
    task: str | None = None  # the name in ``tfm.tasks.TASKS`` that trains it; None: not trainable yet

    def model(self, **overrides: Any) -> nn.Module:
        return self.model_cls(self.config.replace(**overrides))

    def init_shapes(self, **overrides: Any) -> dict[str, Any]:
        """Variables of ``init`` as ``ShapeDtypeStruct``s (nothing allocated)."""
        model = self.model(**overrides)
        cfg = model.config
        return jax.eval_shape(lambda: model.init(jax.random.key(0), *self.example_inputs(cfg)))

    def num_params(self) -> int:
        return count_params(self.init_shapes()["params"])


def _tokens(length):
    return lambda cfg: (jnp.ones((1, length), jnp.int32),)


def _pair(length):
    return lambda cfg: (jnp.ones((1, length), jnp.int32), jnp.ones((1, length), jnp.int32))


def _images(cfg):
    return (jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32),)


def _speech(cfg):
    return (jnp.zeros((1, 2 * cfg.max_source_positions, cfg.num_mel_bins), jnp.float32), jnp.ones((1, 8), jnp.int32))


def _image_text(cfg):
    return (*_images(cfg), jnp.ones((1, 8), jnp.int32))


def _modalities(cfg):
    text = jnp.ones((1, cfg.max_text_len), jnp.int32)
    audio = jnp.zeros((1, cfg.max_audio_frames, cfg.num_mel_bins), jnp.float32)
    return (text, *_images(cfg), audio)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("transformer_base", transformer_base, Transformer, _pair(8), "seq2seq"),
        Preset("transformer_big", transformer_big, Transformer, _pair(8), "seq2seq"),
        Preset("transformer_tiny", transformer_tiny, Transformer, _pair(8), "seq2seq"),
        Preset("transformer_moe_tiny", transformer_moe_tiny, Transformer, _pair(8), "seq2seq"),
        Preset("bert_base", bert_base, BertModel, _tokens(8)),
        Preset("bert_tiny", bert_tiny, BertModel, _tokens(8)),
        Preset("bert_base_mlm", bert_base, BertForMaskedLM, _tokens(8), "mlm"),
        Preset("bert_tiny_mlm", bert_tiny, BertForMaskedLM, _tokens(8), "mlm"),
        Preset("bert_base_classifier", bert_base, BertForSequenceClassification, _tokens(8), "text_classify"),
        Preset("bert_tiny_classifier", bert_tiny, BertForSequenceClassification, _tokens(8), "text_classify"),
        Preset("bert_base_qa", bert_base_qa, BertForQuestionAnswering, _tokens(8)),
        Preset("bert_tiny_qa", bert_tiny_qa, BertForQuestionAnswering, _tokens(8)),
        Preset("gpt2_small", gpt2_small, GPT, _tokens(8), "lm"),
        Preset("gpt_tiny", gpt_tiny, GPT, _tokens(8), "lm"),
        Preset("llama_tiny", llama_tiny, GPT, _tokens(8), "lm"),
        Preset("gpt_moe_tiny", gpt_moe_tiny, GPT, _tokens(8), "lm"),
        Preset("mixtral_8x7b", mixtral_8x7b, GPT, _tokens(8), "lm"),
        Preset("t5_small", t5_small, T5, _pair(8), "seq2seq"),
        Preset("t5_tiny", t5_tiny, T5, _pair(8), "seq2seq"),
        Preset("transformer_xl_tiny", transformer_xl_tiny, TransformerXL, _tokens(8), "lm_memory"),
        Preset("compressive_transformer_tiny", compressive_transformer_tiny, TransformerXL, _tokens(8), "lm_memory"),
        Preset("vit_b16", vit_b16, ViT, _images, "classify"),
        Preset("vit_tiny", vit_tiny, ViT, _images, "classify"),
        Preset("clip_vit_b32", clip_vit_b32, CLIP, _image_text, "contrastive"),
        Preset("clip_tiny", clip_tiny, CLIP, _image_text, "contrastive"),
        Preset("whisper_tiny", whisper_tiny, Whisper, _speech, "speech"),
        Preset("whisper_micro", whisper_micro, Whisper, _speech, "speech"),
        Preset("detr_small", detr_small, DETR, _images, "detect"),
        Preset("detr_tiny", detr_tiny, DETR, _images, "detect"),
        Preset("fusion_tiny", fusion_tiny, Fusion, _modalities, "multimodal"),
    ]
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]


__all__ = [
    "BertConfig", "BertForMaskedLM", "BertForQuestionAnswering", "BertForSequenceClassification", "BertModel",
    "GPT", "GPTConfig",
    "PRESETS", "Preset", "T5", "T5Config", "Transformer", "TransformerConfig", "ViT", "ViTConfig",
    "bert_base", "bert_base_qa", "bert_tiny", "bert_tiny_qa",
    "count_params", "get_preset", "gpt2_small", "gpt_moe_tiny", "gpt_tiny", "llama_tiny", "mixtral_8x7b",
    "t5_small", "t5_tiny", "transformer_base", "transformer_big", "transformer_moe_tiny", "transformer_tiny",
    "TransformerXL", "TransformerXLConfig", "compressive_transformer_tiny", "transformer_xl_tiny",
    "CLIP", "CLIPConfig", "clip_tiny", "clip_vit_b32",
    "vit_b16", "vit_tiny", "Whisper", "WhisperConfig", "whisper_micro", "whisper_tiny",
    "DETR", "DETRConfig", "detr_small", "detr_tiny", "Fusion", "FusionConfig", "fusion_tiny",
]  # fmt: skip
