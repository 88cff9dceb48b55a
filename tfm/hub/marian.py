"""Marian (``MarianMTModel``) <-> ``tfm.models.Transformer``, the paper's encoder-decoder.

Marian is the paper's model with post-LN blocks (LayerNorm, eps 1e-5), static sinusoidal positions
laid out as all sines then all cosines (``sinusoid_layout="halves"``), token embeddings scaled by
sqrt(D) (``scale_embedding``), a ``final_logits_bias`` added to the logits and, usually, one
embedding table shared by the encoder, the decoder and the output head. Its pad token
(``pad_token_id``, often ``vocab_size - 1``) is also the decoder's start token, so the decoder's
self-attention does not mask pads (``mask_target_padding=False``); the source's pads are masked.

torch ``nn.Linear`` stores ``[out, in]``; the sinusoid table is a fixed buffer, not a checkpoint tensor.
When the encoder and decoder tables are shared but the head is not (``tie_word_embeddings=False``),
``transformers`` unties all three, and tfm reads them as three tables (``share_embeddings=False``).
"""

from __future__ import annotations

import numpy as np

from tfm.hub.convert import Architecture, Flat, HubError, heads_in, heads_out, refuse, take
from tfm.models.transformer import Transformer, TransformerConfig, transformer_base

ACTIVATIONS = {"swish": "silu", "silu": "silu", "gelu": "gelu", "relu": "relu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh"}  # fmt: skip
TO_HF_ACTIVATION = {"silu": "swish", "gelu": "gelu", "relu": "relu", "gelu_tanh": "gelu_new"}
NORM_EPSILON = 1e-5  # torch nn.LayerNorm's default, which Marian's layers use


def _one_id(hf: dict, key: str, src: str) -> int | None:
    value = hf.get(key)
    if isinstance(value, list):
        if len(value) != 1:
            raise HubError(f"{src}: {key}={value!r} is not implemented in tfm (one id only)")
        value = value[0]
    return value


def to_tfm(hf: dict, arch: str) -> tuple[type, TransformerConfig]:
    src = f"{arch} config"
    # Options of older configs that the transformers model ignores: only the values it implements are read.
    refuse(hf, src, normalize_before=False, normalize_embedding=False, add_final_layer_norm=False,
           add_bias_logits=False, static_position_embeddings=True, encoder_layerdrop=0.0, decoder_layerdrop=0.0,
           is_decoder=False, tie_encoder_decoder=False)  # fmt: skip
    for enc, dec in (("encoder_ffn_dim", "decoder_ffn_dim"), ("encoder_attention_heads", "decoder_attention_heads")):
        if hf[enc] != hf[dec]:
            raise HubError(f"{src}: {enc}={hf[enc]} differs from {dec}={hf[dec]}; tfm's stacks share one width")
    act = hf.get("activation_function", "gelu")
    if act not in ACTIVATIONS:
        raise HubError(f"{src}: activation_function={act!r} is not implemented in tfm "
                       f"(supported: {tuple(ACTIVATIONS)})")  # fmt: skip
    d = hf["d_model"]
    if d % 2:
        raise HubError(f"{src}: d_model={d} is not implemented in tfm (sinusoidal positions need an even width)")
    if hf.get("pad_token_id") is None:
        raise HubError(f"{src}: pad_token_id=None is not implemented in tfm (the source's padding is that token)")
    vocab = hf["vocab_size"]
    dec_vocab = hf.get("decoder_vocab_size") or vocab
    share = hf.get("share_encoder_decoder_embeddings", True)
    tie = hf.get("tie_word_embeddings", True)
    if share and dec_vocab != vocab:
        raise HubError(f"{src}: decoder_vocab_size={dec_vocab} with share_encoder_decoder_embeddings=True "
                       f"and vocab_size={vocab} is not implemented in tfm")  # fmt: skip
    one_table = share and tie  # transformers unties encoder, decoder and head together
    cfg = transformer_base.replace(
        vocab_size=vocab, target_vocab_size=None if one_table else dec_vocab, share_embeddings=one_table,
        tie_output=tie, num_encoder_layers=hf["encoder_layers"], num_decoder_layers=hf["decoder_layers"],
        d_model=d, num_heads=hf["encoder_attention_heads"], d_ff=hf["encoder_ffn_dim"], activation=ACTIVATIONS[act],
        norm_epsilon=NORM_EPSILON, dropout_rate=hf.get("dropout", 0.1),
        attention_dropout_rate=hf.get("attention_dropout", 0.0),
        activation_dropout_rate=hf.get("activation_dropout", 0.0), position="sinusoidal", sinusoid_layout="halves",
        max_len=hf.get("max_position_embeddings", 1024), scale_embeddings=hf.get("scale_embedding", False),
        pad_id=hf["pad_token_id"], mask_target_padding=False, logits_bias=True,
        bos_id=hf.get("decoder_start_token_id"), eos_id=_one_id(hf, "eos_token_id", src),
    )  # fmt: skip
    return Transformer, cfg


# (transformers sub-layer, tfm sub-layer) per stack; attention projections and norms as named in each.
_ENCODER = (("self_attn", "self_attention"), ("self_attn_layer_norm", "attention_norm"), ("fc1", "mlp/wi"),
            ("fc2", "mlp/wo"), ("final_layer_norm", "mlp_norm"))  # fmt: skip
_DECODER = (("self_attn", "self_attention"), ("self_attn_layer_norm", "self_attention_norm"),
            ("encoder_attn", "cross_attention"), ("encoder_attn_layer_norm", "cross_attention_norm"),
            ("fc1", "mlp/wi"), ("fc2", "mlp/wo"), ("final_layer_norm", "mlp_norm"))  # fmt: skip
_PROJ = (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"), ("out_proj", "out"))


def _sinusoids(length: int, d: int) -> np.ndarray:
    """transformers' Marian table: ``[sin(p w_i) for i < D/2, cos(p w_i) ...]``, ``w_i = 10000^(-2i/D)``."""
    angle = np.arange(length)[:, None] / np.power(10000.0, 2 * np.arange(d // 2) / d)
    return np.concatenate([np.sin(angle), np.cos(angle)], axis=1)


def to_params(tensors: Flat, cfg: TransformerConfig, arch: str) -> Flat:
    t = {k.removeprefix("model."): v for k, v in tensors.items()}
    src, n = arch, cfg.block.num_heads
    get = lambda name: take(t, name, src)  # noqa: E731
    out: Flat = {}
    for stack in ("encoder", "decoder"):  # a stored sinusoid table must be the one tfm computes
        table = t.pop(f"{stack}.embed_positions.weight", None)
        if table is not None and np.max(np.abs(table - _sinusoids(*table.shape))) > 1e-4:
            raise HubError(f"{src}: {stack}.embed_positions.weight is not Marian's sinusoid table")
    if cfg.share_embeddings:
        out["embed/embedding"] = t.pop("shared.weight", None)
        if out["embed/embedding"] is None:
            out["embed/embedding"] = get("encoder.embed_tokens.weight")
        for tied in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
            t.pop(tied, None)
    else:
        out["src_embed/embedding"] = get("encoder.embed_tokens.weight")
        out["tgt_embed/embedding"] = get("decoder.embed_tokens.weight")
        t.pop("shared.weight", None)  # the untied model keeps it, unused
    head = t.pop("lm_head.weight", None)
    if not cfg.tie_output:
        if head is None:
            raise HubError(f"{src}: tie_word_embeddings=False but the checkpoint has no lm_head.weight")
        out["logits_proj/kernel"] = head.T
    bias = t.pop("final_logits_bias", None)  # transformers reads a missing bias as zeros
    out["logits_bias"] = np.zeros((cfg.tgt_vocab,), np.float32) if bias is None else bias.reshape(-1)
    for stack, layers, names in (("encoder", cfg.num_encoder_layers, _ENCODER),
                                 ("decoder", cfg.num_decoder_layers, _DECODER)):  # fmt: skip
        for i in range(layers):
            h, o = f"{stack}.layers.{i}.", f"{stack}/layers_{i}/"
            for hf_name, tfm_name in names:
                if hf_name.endswith("attn"):
                    for hp, tp in _PROJ:
                        w, b = get(h + f"{hf_name}.{hp}.weight").T, get(h + f"{hf_name}.{hp}.bias")
                        out[o + f"{tfm_name}/{tp}/kernel"] = heads_out(w, n) if tp == "out" else heads_in(w, n)
                        out[o + f"{tfm_name}/{tp}/bias"] = b if tp == "out" else b.reshape(n, -1)
                else:  # a norm (weight = scale) or a linear layer (weight = kernel^T)
                    w, norm = get(h + f"{hf_name}.weight"), hf_name.endswith("norm")
                    out[o + tfm_name + ("/scale" if norm else "/kernel")] = w if norm else w.T
                    out[o + f"{tfm_name}/bias"] = get(h + f"{hf_name}.bias")
    if t:
        raise HubError(f"{src}: tensors tfm does not map: {sorted(t)[:4]}")
    return out


def from_params(flat: Flat, cfg: TransformerConfig, arch: str) -> Flat:
    p = flat
    out: Flat = {}
    if cfg.share_embeddings and cfg.tie_output:
        out["model.shared.weight"] = p["embed/embedding"]
    else:  # written as separate tables (copies when tfm shares one): transformers unties them together
        shared = p.get("embed/embedding")
        out["model.encoder.embed_tokens.weight"] = shared if cfg.share_embeddings else p["src_embed/embedding"]
        out["model.decoder.embed_tokens.weight"] = shared if cfg.share_embeddings else p["tgt_embed/embedding"]
    if not cfg.tie_output:
        out["lm_head.weight"] = p["logits_proj/kernel"].T
    bias = p.get("logits_bias", np.zeros((cfg.tgt_vocab,), np.float32))
    out["final_logits_bias"] = bias.reshape(1, -1)
    d = cfg.block.d_model
    for stack, layers, names in (("encoder", cfg.num_encoder_layers, _ENCODER),
                                 ("decoder", cfg.num_decoder_layers, _DECODER)):  # fmt: skip
        for i in range(layers):
            h, o = f"model.{stack}.layers.{i}.", f"{stack}/layers_{i}/"
            for hf_name, tfm_name in names:
                if hf_name.endswith("attn"):
                    for hp, tp in _PROJ:
                        w = p[o + f"{tfm_name}/{tp}/kernel"]
                        out[h + f"{hf_name}.{hp}.weight"] = (w.reshape(-1, d) if tp == "out" else w.reshape(d, -1)).T
                        out[h + f"{hf_name}.{hp}.bias"] = p[o + f"{tfm_name}/{tp}/bias"].reshape(-1)
                else:
                    norm = hf_name.endswith("norm")
                    w = p[o + tfm_name + ("/scale" if norm else "/kernel")]
                    out[h + f"{hf_name}.weight"] = w if norm else w.T
                    out[h + f"{hf_name}.bias"] = p[o + f"{tfm_name}/bias"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def to_hf(cfg: TransformerConfig, arch: str) -> dict:
    b = cfg.block
    one_table = cfg.share_embeddings and cfg.tie_output
    return {
        "architectures": [arch], "model_type": "marian", "vocab_size": cfg.vocab_size,
        "decoder_vocab_size": cfg.tgt_vocab, "share_encoder_decoder_embeddings": one_table,
        "tie_word_embeddings": cfg.tie_output, "d_model": b.d_model, "encoder_layers": cfg.num_encoder_layers,
        "decoder_layers": cfg.num_decoder_layers, "encoder_attention_heads": b.num_heads,
        "decoder_attention_heads": b.num_heads, "encoder_ffn_dim": b.d_ff, "decoder_ffn_dim": b.d_ff,
        "activation_function": TO_HF_ACTIVATION[b.activation], "dropout": b.dropout_rate,
        "attention_dropout": b.attention_dropout_rate, "activation_dropout": b.activation_dropout_rate,
        "max_position_embeddings": cfg.max_len, "scale_embedding": cfg.scale_embeddings,
        "pad_token_id": cfg.pad_id, "decoder_start_token_id": cfg.pad_id if cfg.bos_id is None else cfg.bos_id,
        "eos_token_id": cfg.eos_id, "forced_eos_token_id": cfg.eos_id, "is_encoder_decoder": True,
    }  # fmt: skip


def claims(module, cfg) -> str | None:
    """Marian is the post-LN Transformer with Marian's sinusoid layout, LayerNorm(eps 1e-5) with biases,
    a non-gated FFN, full attention, and a decoder that does not mask pads."""
    if not isinstance(cfg, TransformerConfig):
        return None
    b = cfg.block
    plain = (cfg.position == "sinusoidal" and cfg.sinusoid_layout == "halves" and not cfg.mask_target_padding
             and b.norm == "layernorm" and b.norm_position == "post" and b.norm_epsilon == NORM_EPSILON
             and b.attention_bias and b.mlp_bias and b.activation in TO_HF_ACTIVATION
             and b.num_kv_heads in (None, b.num_heads) and b.head_dim in (None, b.d_model // b.num_heads)
             and b.attention == "full" and not b.num_experts and b.attention_scale is None and not b.use_rope
             and 0 <= cfg.pad_id < min(cfg.vocab_size, cfg.tgt_vocab))  # fmt: skip
    return "MarianMTModel" if plain else None


ARCHITECTURE = Architecture(("MarianMTModel",), to_tfm, to_params, from_params, to_hf, claims)
