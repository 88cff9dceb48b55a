"""T5 (``T5ForConditionalGeneration``) <-> ``tfm.models.T5``, v1.0 and v1.1 alike.

T5 v1.0 (``feed_forward_proj="relu"``) ties the output head to the shared embedding
and rescales the decoder output by ``d_model**-0.5`` before it; v1.1 (``"gated-gelu"``,
which Hugging Face computes with the tanh approximation, ``gelu_new``) has its own
``lm_head`` and no rescale. tfm's T5 rescales exactly when its head is tied, so the
rescale decides the tying: ``scale_decoder_outputs`` where ``config.json`` has it
(``transformers`` v5 writes it, with ``tie_word_embeddings`` always true), else
``tie_word_embeddings``. An untied checkpoint without ``lm_head.weight`` (v5 ties a
missing head to ``shared``) starts its tfm head from the embedding.

Torch ``nn.Linear`` weights are ``[out, in]``; the attention is unscaled (the 1/sqrt(d)
lives in the weights) and the relative position bias, one table per stack, is stored
in layer 0's self-attention. tfm masks the source where it holds ``pad_token_id``
(``transformers`` takes an ``attention_mask``) and its decoder, like Hugging Face's,
is causal only (``mask_decoder_padding=False``: the decoder starts from the pad id).
"""

from __future__ import annotations

import numpy as np

from tfm.hub.convert import Architecture, Flat, HubError, heads_in, heads_out, refuse, take
from tfm.models.t5 import T5, T5Config, t5_small

# (dense_act_fn, is_gated_act) -> tfm activation; "gated-gelu" means gelu_new in transformers
ACTIVATIONS = {
    ("relu", False): "relu", ("gelu", False): "gelu", ("gelu_python", False): "gelu",
    ("gelu_new", False): "gelu_tanh", ("gelu_pytorch_tanh", False): "gelu_tanh",
    ("silu", False): "silu", ("swish", False): "silu",
    ("gelu_new", True): "geglu_tanh", ("gelu_pytorch_tanh", True): "geglu_tanh",
    ("gelu_python", True): "geglu", ("silu", True): "swiglu", ("swish", True): "swiglu",
}  # fmt: skip
FEED_FORWARD = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu",
                "geglu_tanh": "gated-gelu", "geglu": "gated-gelu_python", "swiglu": "gated-silu"}  # fmt: skip


def _activation(hf: dict, src: str) -> str:
    """The tfm activation of ``feed_forward_proj``, read as ``transformers`` reads it."""
    proj = hf.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    gated, act = parts[0] == "gated" and len(parts) == 2, parts[-1]
    act = "gelu_new" if proj == "gated-gelu" else act
    if (len(parts) > 1 and not gated) or (act, gated) not in ACTIVATIONS:
        supported = sorted({"gated-gelu", *(("gated-" if g else "") + a for a, g in ACTIVATIONS)})
        raise HubError(f"{src}: feed_forward_proj={proj!r} is not implemented in tfm (supported: {supported})")
    # Stored derived fields override feed_forward_proj in transformers: refuse a disagreement.
    for key, want in (("is_gated_act", gated), ("dense_act_fn", act)):
        if key in hf and hf[key] != want:
            raise HubError(f"{src}: {key}={hf[key]!r} contradicts feed_forward_proj={proj!r} (which means {want!r})")
    return ACTIVATIONS[act, gated]


def to_tfm(hf: dict, arch: str) -> tuple[type, T5Config]:
    src = f"{arch} config"
    refuse(hf, src, is_encoder_decoder=True, is_decoder=False, tie_encoder_decoder=False)
    pad = hf.get("pad_token_id", 0)
    if pad is None:
        raise HubError(f"{src}: pad_token_id=None is not implemented in tfm (its T5 masks the source by the pad id)")
    tied = hf.get("tie_word_embeddings", True) is not False
    scaled = hf.get("scale_decoder_outputs", tied)
    if scaled and not tied:
        raise HubError(f"{src}: scale_decoder_outputs=True with tie_word_embeddings=False is not implemented in tfm "
                       f"(its T5 rescales the decoder output only before a tied head)")  # fmt: skip
    layers = hf.get("num_layers", 6)
    dropout = hf.get("dropout_rate", 0.1)
    cfg = t5_small.replace(
        vocab_size=hf.get("vocab_size", 32128), num_encoder_layers=layers,
        num_decoder_layers=hf.get("num_decoder_layers") or layers,
        num_buckets=hf.get("relative_attention_num_buckets", 32),
        max_distance=hf.get("relative_attention_max_distance", 128), tie_embeddings=bool(scaled),
        pad_id=pad, mask_decoder_padding=False, d_model=hf.get("d_model", 512),
        num_heads=hf.get("num_heads", 8), head_dim=hf.get("d_kv", 64), d_ff=hf.get("d_ff", 2048),
        activation=_activation(hf, src), norm_epsilon=hf.get("layer_norm_epsilon", 1e-6), dropout_rate=dropout,
        attention_dropout_rate=dropout, activation_dropout_rate=dropout,
    )  # fmt: skip
    return T5, cfg


def _layer_map(cfg: T5Config, stack: str, i: int) -> list[tuple[str, str]]:
    """``(Hugging Face prefix, tfm prefix)`` of each sub-layer of layer ``i`` of ``stack``."""
    h, o = f"{stack}.block.{i}.layer.", f"{stack}/layers_{i}/"
    if stack == "encoder":
        return [(h + "0.SelfAttention.", o + "self_attention/"), (h + "0.layer_norm.", o + "attention_norm/"),
                (h + "1.DenseReluDense.", o + "mlp/"), (h + "1.layer_norm.", o + "mlp_norm/")]  # fmt: skip
    return [(h + "0.SelfAttention.", o + "self_attention/"), (h + "0.layer_norm.", o + "self_attention_norm/"),
            (h + "1.EncDecAttention.", o + "cross_attention/"), (h + "1.layer_norm.", o + "cross_attention_norm/"),
            (h + "2.DenseReluDense.", o + "mlp/"), (h + "2.layer_norm.", o + "mlp_norm/")]  # fmt: skip


def _mlp_names(cfg: T5Config) -> tuple[str, ...]:
    return ("wi_0", "wi_1", "wo") if cfg.block.activation in ("geglu_tanh", "geglu", "swiglu") else ("wi", "wo")


def _stacks(cfg: T5Config):
    for stack, n in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
        for i in range(n):
            yield stack, i, _layer_map(cfg, stack, i)


def to_params(tensors: Flat, cfg: T5Config, arch: str) -> Flat:
    t, src, n = dict(tensors), arch, cfg.block.num_heads
    get = lambda name: take(t, name, src)  # noqa: E731
    shared = get("shared.weight")
    out: Flat = {"embed/embedding": shared}
    for stack in ("encoder", "decoder"):
        out[f"{stack}/final_norm/scale"] = get(f"{stack}.final_layer_norm.weight")
        bias = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        out[f"{stack}_relative_bias/embedding"] = get(bias)
        copy = t.pop(f"{stack}.embed_tokens.weight", None)  # older checkpoints store the tied copies
        if copy is not None and not np.array_equal(copy, shared):
            raise HubError(f"{src}: {stack}.embed_tokens.weight differs from shared.weight (tfm's T5 has one)")
    t.pop("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight", None)  # unused by transformers
    for _, _, parts in _stacks(cfg):
        for hf, ours in parts:
            if ours.endswith("attention/"):
                for x, name in (("q", "query"), ("k", "key"), ("v", "value")):
                    out[ours + f"{name}/kernel"] = heads_in(get(hf + f"{x}.weight").T, n)
                out[ours + "out/kernel"] = heads_out(get(hf + "o.weight").T, n)
            elif ours.endswith("mlp/"):
                for name in _mlp_names(cfg):
                    out[ours + f"{name}/kernel"] = get(hf + f"{name}.weight").T
            else:
                out[ours + "scale"] = get(hf + "weight")
    head = t.pop("lm_head.weight", None)
    if cfg.tie_embeddings and head is not None and not np.array_equal(head, shared):
        raise HubError(f"{src}: lm_head.weight differs from shared.weight, but the config rescales the decoder "
                       f"output (scale_decoder_outputs=True), which tfm's T5 does only before a tied head")  # fmt: skip
    if not cfg.tie_embeddings:
        out["lm_head/kernel"] = (shared if head is None else head).T  # transformers ties a missing head
    if t:
        raise HubError(f"{src}: tensors tfm does not map: {sorted(t)[:4]}")
    return out


def from_params(flat: Flat, cfg: T5Config, arch: str) -> Flat:
    p = flat
    out: Flat = {"shared.weight": p["embed/embedding"]}
    for stack in ("encoder", "decoder"):
        out[f"{stack}.final_layer_norm.weight"] = p[f"{stack}/final_norm/scale"]
        bias = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        out[bias] = p[f"{stack}_relative_bias/embedding"]
    for _, _, parts in _stacks(cfg):
        for hf, ours in parts:
            if ours.endswith("attention/"):
                for x, name in (("q", "query"), ("k", "key"), ("v", "value")):
                    w = p[ours + f"{name}/kernel"]
                    out[hf + f"{x}.weight"] = w.reshape(w.shape[0], -1).T
                w = p[ours + "out/kernel"]
                out[hf + "o.weight"] = w.reshape(-1, w.shape[-1]).T
            elif ours.endswith("mlp/"):
                for name in _mlp_names(cfg):
                    out[hf + f"{name}.weight"] = p[ours + f"{name}/kernel"].T
            else:
                out[hf + "weight"] = p[ours + "scale"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = p["lm_head/kernel"].T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def to_hf(cfg: T5Config, arch: str) -> dict:
    """The ``config.json``; the ids other than pad are T5's conventions (eos 1, the decoder starts from pad)."""
    b = cfg.block
    proj = FEED_FORWARD[b.activation]
    act = proj.removeprefix("gated-")
    return {
        "architectures": [arch], "model_type": "t5", "vocab_size": cfg.vocab_size, "d_model": b.d_model,
        "d_kv": b.head_width, "d_ff": b.d_ff, "num_layers": cfg.num_encoder_layers,
        "num_decoder_layers": cfg.num_decoder_layers, "num_heads": b.num_heads,
        "relative_attention_num_buckets": cfg.num_buckets, "relative_attention_max_distance": cfg.max_distance,
        "dropout_rate": b.dropout_rate, "layer_norm_epsilon": b.norm_epsilon, "feed_forward_proj": proj,
        "is_gated_act": proj.startswith("gated-"), "dense_act_fn": "gelu_new" if proj == "gated-gelu" else act,
        "tie_word_embeddings": cfg.tie_embeddings, "scale_decoder_outputs": cfg.tie_embeddings,
        "is_encoder_decoder": True, "pad_token_id": cfg.pad_id, "decoder_start_token_id": cfg.pad_id,
        "eos_token_id": 1, "initializer_factor": 1.0,
    }  # fmt: skip


def claims(module, cfg) -> str | None:
    """T5 is tfm's T5 with RMSNorm before each sub-layer, no biases, unscaled logits and a dense FFN."""
    if not isinstance(cfg, T5Config):
        return None
    b = cfg.block
    plain = (b.norm == "rmsnorm" and b.norm_position == "pre" and not b.attention_bias and not b.mlp_bias
             and b.activation in FEED_FORWARD and b.num_kv_heads in (None, b.num_heads) and not b.num_experts
             and not b.use_rope and b.attention == "full" and b.attention_scale == 1.0)  # fmt: skip
    return "T5ForConditionalGeneration" if plain else None


ARCHITECTURE = Architecture(("T5ForConditionalGeneration",), to_tfm, to_params, from_params, to_hf, claims)
