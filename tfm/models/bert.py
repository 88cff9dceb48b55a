"""Encoder-only model (BERT, Devlin et al. 2019): backbone, masked-LM head, classifier.

    tokens + positions + segments -> LayerNorm -> dropout -> L x post-LN EncoderBlock -> sequence
    sequence[:, 0] -> Dense -> tanh -> pooled

``BertModel`` is the backbone (embeddings, encoder, pooler) — for the
``bert_base`` preset exactly BERT-base-uncased's 109,482,240 parameters.
``BertForMaskedLM`` adds the MLM transform and the output layer tied to the
token embedding; ``BertForSequenceClassification`` adds dropout + a linear
classifier on the pooled vector; ``BertForQuestionAnswering`` a linear span head
(start and end logits per position). ``pooler=False`` builds the backbone without
the pooler, as Hugging Face's masked-LM and question-answering models do.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp
from jax import Array

from tfm import sharding as sh
from tfm.layers.blocks import BlockConfig, EncoderBlock, Stack
from tfm.layers.embed import Embed, OutputHead
from tfm.layers.feedforward import ACTIVATIONS
from tfm.layers.linear import Einsum
from tfm.layers.masks import key_padding_mask
from tfm.layers.norms import LayerNorm
from tfm.layers.position import LearnedPositionEmbedding
from tfm.models.common import ModelConfig


@dataclasses.dataclass(frozen=True)
class BertConfig(ModelConfig):
    """BERT's own fields; ``block`` holds the layers' (post-LN, GELU, LayerNorm eps 1e-12).

    Every ``block`` field is also addressed by its name (``ModelConfig``):
    ``bert_tiny.replace(attention="local", attention_window=16, attention_dropout_rate=0.0)``.
    """

    vocab_size: int = 30522
    max_len: int = 512
    type_vocab_size: int = 2
    num_layers: int = 12
    init_std: float = 0.02
    num_labels: int = 2
    pad_id: int = 0  # tokens with this id are padding (keys masked); -1: no token is padding
    pooler: bool = True  # False: no pooler (BertModel returns pooled=None), as in HF's masked-LM and QA models
    scan_layers: bool = True
    remat_policy: str = "none"
    block: BlockConfig = BlockConfig(
        d_model=768, num_heads=12, d_ff=3072, activation="gelu", norm_epsilon=1e-12, norm_position="post",
        dropout_rate=0.1, attention_dropout_rate=0.1,
    )  # fmt: skip

    # A bidirectional encoder: never causal, nothing to decode; weights from N(0, init_std).
    DERIVED: ClassVar[tuple[str, ...]] = ("causal", "decode", "kernel_init_std", "out_init_std")

    def layer_config(self) -> BlockConfig:
        return dataclasses.replace(self.block, kernel_init_std=self.init_std)


bert_base = BertConfig()
bert_tiny = bert_base.replace(vocab_size=64, max_len=32, d_model=32, num_heads=4, num_layers=2, d_ff=64,
                              dropout_rate=0.0, attention_dropout_rate=0.0)  # fmt: skip
bert_base_qa = bert_base.replace(pooler=False)  # BertForQuestionAnswering: 108,893,186 parameters, as Hugging Face's
bert_tiny_qa = bert_tiny.replace(pooler=False)


class BertModel(nn.Module):
    """``tokens [B, T]`` (+ ``segment_ids``) -> ``(sequence [B, T, D], pooled [B, D])`` (pooled None without a pooler).

    Token ``pad_id`` is padding (keys masked). ``segment_ids`` here are BERT's
    sentence A/B *token types*, not packing segments.
    """

    config: BertConfig

    def setup(self) -> None:
        cfg, b = self.config, self.config.block
        init = nn.initializers.normal(stddev=cfg.init_std)
        self.token_embed = Embed(cfg.vocab_size, b.d_model, embedding_init=init, dtype=b.dtype, param_dtype=b.param_dtype)
        self.pos_embed = LearnedPositionEmbedding(cfg.max_len, b.d_model, init, param_dtype=b.param_dtype)
        self.type_embed = Embed(cfg.type_vocab_size, b.d_model, embedding_init=init, dtype=b.dtype, param_dtype=b.param_dtype)
        self.embed_norm = LayerNorm(b.norm_epsilon, dtype=b.dtype, param_dtype=b.param_dtype)
        self.dropout = nn.Dropout(b.dropout_rate)
        self.encoder = Stack(EncoderBlock, cfg.layer_config(), cfg.num_layers, cfg.scan_layers, cfg.remat_policy)
        if cfg.pooler:
            self.pooler = Einsum((b.d_model, b.d_model), (sh.EMBED, sh.MLP), use_bias=True, kernel_init=init,
                                 dtype=b.dtype, param_dtype=b.param_dtype)

    def __call__(
        self, tokens: Array, segment_ids: Array | None = None, *, deterministic: bool = True
    ) -> tuple[Array, Array | None]:
        cfg = self.config
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, T] ids, got shape {tokens.shape}")
        t = tokens.shape[1]
        if t > cfg.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len={cfg.max_len}")
        segment_ids = jnp.zeros_like(tokens) if segment_ids is None else segment_ids
        x = self.token_embed(tokens) + self.pos_embed(jnp.arange(t)).astype(cfg.block.dtype) + self.type_embed(segment_ids)
        x = self.dropout(self.embed_norm(x), deterministic=deterministic)
        x = self.encoder(x, mask=key_padding_mask(tokens != cfg.pad_id), deterministic=deterministic)
        pooled = jnp.tanh(self.pooler("BD,DE->BE", x[:, 0])) if cfg.pooler else None
        return x, pooled


class BertForMaskedLM(nn.Module):
    """Backbone + MLM head: ``tokens -> logits [B, T, V]`` (float32), output layer tied to the token embedding."""

    config: BertConfig

    @nn.compact
    def __call__(self, tokens: Array, segment_ids: Array | None = None, *, deterministic: bool = True) -> Array:
        cfg, b = self.config, self.config.block
        bert = BertModel(cfg, name="bert")
        x, _ = bert(tokens, segment_ids, deterministic=deterministic)
        init = nn.initializers.normal(stddev=cfg.init_std)
        h = Einsum((b.d_model, b.d_model), (sh.EMBED, sh.MLP), use_bias=True, kernel_init=init, dtype=b.dtype, param_dtype=b.param_dtype, name="mlm_transform")("BTD,DE->BTE", x)
        h = LayerNorm(b.norm_epsilon, dtype=b.dtype, param_dtype=b.param_dtype, name="mlm_norm")(ACTIVATIONS[b.activation](h))
        out_bias = self.param("mlm_bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (sh.VOCAB,)), (cfg.vocab_size,), b.param_dtype)
        return OutputHead(cfg.vocab_size, name="mlm_head")(h, bert.token_embed) + out_bias.astype(jnp.float32)


class BertForSequenceClassification(nn.Module):
    """Backbone + dropout + linear on the pooled ``[CLS]`` vector: ``tokens -> logits [B, num_labels]``."""

    config: BertConfig

    @nn.compact
    def __call__(self, tokens: Array, segment_ids: Array | None = None, *, deterministic: bool = True) -> Array:
        cfg, b = self.config, self.config.block
        if not cfg.pooler:
            raise ValueError("BertForSequenceClassification classifies the pooled [CLS] vector: it needs pooler=True")
        _, pooled = BertModel(cfg, name="bert")(tokens, segment_ids, deterministic=deterministic)
        pooled = nn.Dropout(b.dropout_rate)(pooled, deterministic=deterministic)
        head = Einsum((b.d_model, cfg.num_labels), (sh.EMBED, sh.CLASSES), use_bias=True, kernel_init=nn.initializers.normal(stddev=cfg.init_std), dtype=b.dtype, param_dtype=b.param_dtype, name="classifier")
        return head("BD,DC->BC", pooled).astype(jnp.float32)


class BertForQuestionAnswering(nn.Module):
    """Backbone + linear span head: ``tokens -> (start_logits [B, T], end_logits [B, T])`` (float32).

    Extractive QA (SQuAD): the answer is the span from the argmax of ``start_logits``
    to that of ``end_logits`` (over the context's positions). The presets build it
    without the pooler, which the head does not read.
    """

    config: BertConfig

    @nn.compact
    def __call__(
        self, tokens: Array, segment_ids: Array | None = None, *, deterministic: bool = True
    ) -> tuple[Array, Array]:
        cfg, b = self.config, self.config.block
        x, _ = BertModel(cfg, name="bert")(tokens, segment_ids, deterministic=deterministic)
        init = nn.initializers.normal(stddev=cfg.init_std)
        head = Einsum((b.d_model, 2), (sh.EMBED, None), use_bias=True, kernel_init=init, dtype=b.dtype,
                      param_dtype=b.param_dtype, name="qa_outputs")
        logits = head("BTD,DS->BTS", x).astype(jnp.float32)
        return logits[..., 0], logits[..., 1]
