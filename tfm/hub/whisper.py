"""Whisper (``WhisperForConditionalGeneration``) <-> ``tfm.models.Whisper``: a convolutional stem and pre-LN
encoder over log-mel frames, a pre-LN decoder with learned positions, the head tied to the token embedding.

transformers' ``Conv1d`` weights are ``[D, C, 3]`` (out, in, kernel); tfm's ``conv1``/``conv2`` kernels are
``[3, C, D]`` over the three frames each output reads (``tfm.models.whisper.conv1d``, zero-padded by one
frame each side, as ``padding=1``). Hugging Face takes ``input_features`` ``[B, M, F]``, tfm ``[B, F, M]``:
transpose the inputs, not the weights; transformers also insists on ``F = 2 * max_source_positions``.

The encoder's positions are fixed sinusoids: a frozen ``embed_positions.weight`` in transformers, computed in
tfm (``tfm.models.whisper.sinusoids``). An import checks the stored table is that one: transformers and
OpenAI compute it in float32, whose rounding of the angle ``p w`` (a few ulps of it) leaves entries up to
~1e-4 from the exact table at p = 1500, so the check allows ``1e-6 (1 + p w)``. An export writes tfm's.
The key projections have no bias (``key_bias=False``); every LayerNorm is torch's default (eps 1e-5).
``scale_embedding`` is read by no transformers Whisper module (the embedding is never scaled): it is ignored.
Token ids: ``decoder_start_token_id`` is tfm's ``bos_id``; ``pad_token_id`` and ``eos_token_id`` keep their names.
"""

from __future__ import annotations

import numpy as np

from tfm.hub.convert import Architecture, Flat, HubError, layer_from_tfm, layer_to_tfm, refuse, take
from tfm.hub.marian import ACTIVATIONS, TO_HF_ACTIVATION
from tfm.models.whisper import Whisper, WhisperConfig, sinusoids, whisper_tiny

ARCH = "WhisperForConditionalGeneration"
NORM_EPSILON = 1e-5  # torch nn.LayerNorm's default, which all of Whisper's norms use
_ENCODER = (("self_attn", "self_attention"), ("self_attn_layer_norm", "attention_norm"), ("fc1", "mlp/wi"),
            ("fc2", "mlp/wo"), ("final_layer_norm", "mlp_norm"))  # fmt: skip
_DECODER = (("self_attn", "self_attention"), ("self_attn_layer_norm", "self_attention_norm"),
            ("encoder_attn", "cross_attention"), ("encoder_attn_layer_norm", "cross_attention_norm"),
            ("fc1", "mlp/wi"), ("fc2", "mlp/wo"), ("final_layer_norm", "mlp_norm"))  # fmt: skip


def _one_id(hf: dict, key: str, src: str) -> int:
    value = hf.get(key)
    if isinstance(value, list):
        if len(value) != 1:
            raise HubError(f"{src}: {key}={value!r} is not implemented in tfm (one id only)")
        value = value[0]
    if value is None or not 0 <= value < hf["vocab_size"]:
        raise HubError(f"{src}: {key}={value!r} is not implemented in tfm "
                       f"(a token of the vocabulary of {hf['vocab_size']})")  # fmt: skip
    return int(value)


def to_tfm(hf: dict, arch: str) -> tuple[type, WhisperConfig]:
    src = f"{arch} config"
    refuse(hf, src, encoder_layerdrop=0.0, decoder_layerdrop=0.0, apply_spec_augment=False, tie_word_embeddings=True,
           is_encoder_decoder=True)  # fmt: skip
    for enc, dec in (("encoder_ffn_dim", "decoder_ffn_dim"), ("encoder_attention_heads", "decoder_attention_heads")):
        if hf.get(enc) != hf.get(dec):
            raise HubError(f"{src}: {enc}={hf.get(enc)} differs from {dec}={hf.get(dec)}; tfm's stacks share one width")
    act = hf.get("activation_function", "gelu")
    if act not in ACTIVATIONS:
        raise HubError(f"{src}: activation_function={act!r} is not implemented in tfm "
                       f"(supported: {tuple(ACTIVATIONS)})")  # fmt: skip
    d, n = hf["d_model"], hf["encoder_attention_heads"]
    if d % n or d % 2:
        raise HubError(f"{src}: d_model={d} is not implemented in tfm (an even multiple of the {n} heads)")
    cfg = whisper_tiny.replace(
        vocab_size=hf["vocab_size"], num_mel_bins=hf.get("num_mel_bins", 80),
        max_source_positions=hf.get("max_source_positions", 1500),
        max_target_positions=hf.get("max_target_positions", 448), num_encoder_layers=hf["encoder_layers"],
        num_decoder_layers=hf["decoder_layers"], pad_id=_one_id(hf, "pad_token_id", src),
        bos_id=_one_id(hf, "decoder_start_token_id", src), eos_id=_one_id(hf, "eos_token_id", src), d_model=d,
        num_heads=n, d_ff=hf["encoder_ffn_dim"], activation=ACTIVATIONS[act], norm_epsilon=NORM_EPSILON,
        dropout_rate=hf.get("dropout", 0.0), attention_dropout_rate=hf.get("attention_dropout", 0.0),
        activation_dropout_rate=hf.get("activation_dropout", 0.0),
    )  # fmt: skip
    return Whisper, cfg


def check_sinusoids(table: np.ndarray, src: str) -> None:
    """``HubError`` unless ``table`` ``[P, D]`` is Whisper's sinusoid table up to float32 rounding of the angles."""
    length, d = table.shape
    w = np.exp(-np.log(10_000.0) / (d // 2 - 1) * np.arange(d // 2))
    angle = np.arange(length)[:, None] * np.concatenate([w, w])[None, :]
    if np.any(np.abs(table.astype(np.float64) - sinusoids(length, d)) > 1e-6 * (1 + angle)):
        raise HubError(f"{src}: model.encoder.embed_positions.weight is not Whisper's sinusoid table "
                       f"(tfm computes those positions)")  # fmt: skip


def to_params(tensors: Flat, cfg: WhisperConfig, arch: str) -> Flat:
    t = dict(tensors)
    src, n = arch, cfg.block.num_heads
    get = lambda name: take(t, name, src)  # noqa: E731
    out: Flat = {}
    table = get("model.encoder.embed_positions.weight")
    if table.shape != (cfg.max_source_positions, cfg.block.d_model):
        raise HubError(f"{src}: model.encoder.embed_positions.weight has shape {table.shape}, "
                       f"not ({cfg.max_source_positions}, {cfg.block.d_model})")  # fmt: skip
    check_sinusoids(table, src)
    for conv in ("conv1", "conv2"):  # Conv1d [D, C, 3] -> Einsum [3, C, D]
        out[f"{conv}/kernel"] = get(f"model.encoder.{conv}.weight").transpose(2, 1, 0)
        out[f"{conv}/bias"] = get(f"model.encoder.{conv}.bias")
    out["embed/embedding"] = get("model.decoder.embed_tokens.weight")
    out["tgt_pos/embedding"] = get("model.decoder.embed_positions.weight")
    head = t.pop("proj_out.weight", None)  # tied: transformers usually does not store it
    if head is not None and not np.array_equal(head, out["embed/embedding"]):
        raise HubError(f"{src}: proj_out.weight differs from model.decoder.embed_tokens.weight (tfm ties them)")
    for stack, layers, names in (("encoder", cfg.num_encoder_layers, _ENCODER),
                                 ("decoder", cfg.num_decoder_layers, _DECODER)):  # fmt: skip
        for i in range(layers):
            h, o = f"model.{stack}.layers.{i}.", f"{stack}/layers_{i}/"
            out.update(layer_to_tfm(get, h, o, n, names, key_bias=False))
        out[f"{stack}/final_norm/scale"] = get(f"model.{stack}.layer_norm.weight")
        out[f"{stack}/final_norm/bias"] = get(f"model.{stack}.layer_norm.bias")
    if t:
        raise HubError(f"{src}: tensors tfm does not map: {sorted(t)[:4]}")
    return out


def from_params(flat: Flat, cfg: WhisperConfig, arch: str) -> Flat:
    p, d = flat, cfg.block.d_model
    dtype = p["embed/embedding"].dtype  # the sinusoids in the parameters' dtype, like every other tensor
    out: Flat = {"model.encoder.embed_positions.weight": sinusoids(cfg.max_source_positions, d).astype(dtype)}
    for conv in ("conv1", "conv2"):
        out[f"model.encoder.{conv}.weight"] = p[f"{conv}/kernel"].transpose(2, 1, 0)
        out[f"model.encoder.{conv}.bias"] = p[f"{conv}/bias"]
    out["model.decoder.embed_tokens.weight"] = p["embed/embedding"]
    out["model.decoder.embed_positions.weight"] = p["tgt_pos/embedding"]
    for stack, layers, names in (("encoder", cfg.num_encoder_layers, _ENCODER),
                                 ("decoder", cfg.num_decoder_layers, _DECODER)):  # fmt: skip
        for i in range(layers):
            h, o = f"model.{stack}.layers.{i}.", f"{stack}/layers_{i}/"
            out.update(layer_from_tfm(p, h, o, d, names, key_bias=False))
        out[f"model.{stack}.layer_norm.weight"] = p[f"{stack}/final_norm/scale"]
        out[f"model.{stack}.layer_norm.bias"] = p[f"{stack}/final_norm/bias"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def to_hf(cfg: WhisperConfig, arch: str) -> dict:
    b = cfg.block
    return {
        "architectures": [arch], "model_type": "whisper", "vocab_size": cfg.vocab_size,
        "num_mel_bins": cfg.num_mel_bins, "d_model": b.d_model, "encoder_layers": cfg.num_encoder_layers,
        "decoder_layers": cfg.num_decoder_layers, "encoder_attention_heads": b.num_heads,
        "decoder_attention_heads": b.num_heads, "encoder_ffn_dim": b.d_ff, "decoder_ffn_dim": b.d_ff,
        "activation_function": TO_HF_ACTIVATION[b.activation], "dropout": b.dropout_rate,
        "attention_dropout": b.attention_dropout_rate, "activation_dropout": b.activation_dropout_rate,
        "max_source_positions": cfg.max_source_positions, "max_target_positions": cfg.max_target_positions,
        "pad_token_id": cfg.pad_id, "decoder_start_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id,
        "bos_token_id": cfg.eos_id,  # Whisper's is <|endoftext|>, the EOS; no module reads it
        "scale_embedding": False, "tie_word_embeddings": True, "is_encoder_decoder": True,
        "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0, "apply_spec_augment": False,
        "suppress_tokens": None, "begin_suppress_tokens": None,  # tfm's decoding suppresses nothing by default
    }  # fmt: skip


def claims(module, cfg) -> str | None:
    """Whisper's stacks: pre-LN LayerNorm (eps 1e-5) with biases, no key bias, a plain FFN, full attention."""
    if not isinstance(cfg, WhisperConfig):
        return None
    b = cfg.block
    plain = (b.norm == "layernorm" and b.norm_position == "pre" and b.norm_epsilon == NORM_EPSILON
             and b.attention_bias and not b.key_bias and b.mlp_bias and b.activation in TO_HF_ACTIVATION
             and b.num_kv_heads in (None, b.num_heads) and b.head_dim in (None, b.d_model // b.num_heads)
             and b.attention == "full" and not b.num_experts and b.attention_scale is None
             and not b.use_rope)  # fmt: skip
    return ARCH if plain else None


ARCHITECTURE = Architecture((ARCH,), to_tfm, to_params, from_params, to_hf, claims)
