"""GPT-2 (``GPT2LMHeadModel``) <-> ``tfm.models.GPT`` with learned positions and LayerNorm.

GPT-2 stores its projections as ``Conv1D`` weights, ``[in, out]``, with the query,
key and value fused in ``c_attn`` (``[D, 3D]``); the output head is tied to ``wte``.
"""

from __future__ import annotations

import numpy as np

from tfm.hub.convert import Architecture, Flat, HubError, heads_in, heads_out, refuse, take
from tfm.models.gpt import GPT, GPTConfig, gpt2_small

ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
               "silu": "silu", "swish": "silu"}  # fmt: skip


def to_tfm(hf: dict, arch: str) -> tuple[type, GPTConfig]:
    src = f"{arch} config"
    refuse(hf, src, add_cross_attention=False, scale_attn_by_inverse_layer_idx=False)
    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise HubError(f"{src}: activation_function={act!r} is not implemented in tfm (supported: {tuple(ACTIVATIONS)})")
    d = hf["n_embd"]
    cfg = gpt2_small.replace(
        vocab_size=hf["vocab_size"], max_len=hf["n_positions"], num_layers=hf["n_layer"], d_model=d,
        num_heads=hf["n_head"], d_ff=hf.get("n_inner") or 4 * d, activation=ACTIVATIONS[act],
        norm_epsilon=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=hf.get("tie_word_embeddings", True),
        init_std=hf.get("initializer_range", 0.02),
        dropout_rate=hf.get("resid_pdrop", 0.1), attention_dropout_rate=hf.get("attn_pdrop", 0.1),
        attention_scale=None if hf.get("scale_attn_weights", True) else 1.0,
    )  # fmt: skip
    return GPT, cfg


def to_params(tensors: Flat, cfg: GPTConfig, arch: str) -> Flat:
    t = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    src, n = arch, cfg.block.num_heads
    get = lambda name: take(t, name, src)  # noqa: E731
    out: Flat = {"embed/embedding": get("wte.weight"), "pos_embed/embedding": get("wpe.weight"),
                 "decoder/final_norm/scale": get("ln_f.weight"), "decoder/final_norm/bias": get("ln_f.bias")}  # fmt: skip
    for i in range(cfg.num_layers):
        h, o = f"h.{i}.", f"decoder/layers_{i}/"
        q, k, v = np.split(get(h + "attn.c_attn.weight"), 3, axis=1)
        qb, kb, vb = np.split(get(h + "attn.c_attn.bias"), 3)
        for name, w, b in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
            out[o + f"self_attention/{name}/kernel"] = heads_in(w, n)
            out[o + f"self_attention/{name}/bias"] = b.reshape(n, -1)
        out[o + "self_attention/out/kernel"] = heads_out(get(h + "attn.c_proj.weight"), n)
        out[o + "self_attention/out/bias"] = get(h + "attn.c_proj.bias")
        for hf_name, tfm_name in (("ln_1", "attention_norm"), ("ln_2", "mlp_norm")):
            out[o + f"{tfm_name}/scale"] = get(h + f"{hf_name}.weight")
            out[o + f"{tfm_name}/bias"] = get(h + f"{hf_name}.bias")
        out[o + "mlp/wi/kernel"], out[o + "mlp/wi/bias"] = get(h + "mlp.c_fc.weight"), get(h + "mlp.c_fc.bias")
        out[o + "mlp/wo/kernel"], out[o + "mlp/wo/bias"] = get(h + "mlp.c_proj.weight"), get(h + "mlp.c_proj.bias")
        t.pop(h + "attn.bias", None)  # old checkpoints store the causal mask as a buffer
        t.pop(h + "attn.masked_bias", None)
    head = t.pop("lm_head.weight", None)  # tied: the same values as wte when present
    if not cfg.tie_embeddings:
        if head is None:
            raise HubError(f"{src}: tie_word_embeddings=False but the checkpoint has no lm_head.weight")
        out["lm_head/kernel"] = head.T
    if t:
        raise HubError(f"{src}: tensors tfm does not map: {sorted(t)[:4]}")
    return out


def from_params(flat: Flat, cfg: GPTConfig, arch: str) -> Flat:
    p = flat
    out: Flat = {"transformer.wte.weight": p["embed/embedding"], "transformer.wpe.weight": p["pos_embed/embedding"],
                 "transformer.ln_f.weight": p["decoder/final_norm/scale"], "transformer.ln_f.bias": p["decoder/final_norm/bias"]}  # fmt: skip
    d = cfg.block.d_model
    for i in range(cfg.num_layers):
        h, o = f"transformer.h.{i}.", f"decoder/layers_{i}/"
        a = o + "self_attention/"
        out[h + "attn.c_attn.weight"] = np.concatenate([p[a + f"{x}/kernel"].reshape(d, -1) for x in ("query", "key", "value")], axis=1)
        out[h + "attn.c_attn.bias"] = np.concatenate([p[a + f"{x}/bias"].reshape(-1) for x in ("query", "key", "value")])
        out[h + "attn.c_proj.weight"] = p[a + "out/kernel"].reshape(-1, d)
        out[h + "attn.c_proj.bias"] = p[a + "out/bias"]
        for hf_name, tfm_name in (("ln_1", "attention_norm"), ("ln_2", "mlp_norm")):
            out[h + f"{hf_name}.weight"], out[h + f"{hf_name}.bias"] = p[o + f"{tfm_name}/scale"], p[o + f"{tfm_name}/bias"]
        out[h + "mlp.c_fc.weight"], out[h + "mlp.c_fc.bias"] = p[o + "mlp/wi/kernel"], p[o + "mlp/wi/bias"]
        out[h + "mlp.c_proj.weight"], out[h + "mlp.c_proj.bias"] = p[o + "mlp/wo/kernel"], p[o + "mlp/wo/bias"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = p["lm_head/kernel"].T
    return out


def to_hf(cfg: GPTConfig, arch: str) -> dict:
    b = cfg.block
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}[b.activation]
    return {
        "architectures": [arch], "model_type": "gpt2", "vocab_size": cfg.vocab_size, "n_positions": cfg.max_len,
        "n_embd": b.d_model, "n_layer": cfg.num_layers, "n_head": b.num_heads, "n_inner": b.d_ff,
        "activation_function": act, "layer_norm_epsilon": b.norm_epsilon, "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std, "resid_pdrop": b.dropout_rate, "embd_pdrop": b.dropout_rate,
        "attn_pdrop": b.attention_dropout_rate, "scale_attn_weights": b.attention_scale is None,
        "bos_token_id": cfg.vocab_size - 1, "eos_token_id": cfg.vocab_size - 1,
    }  # fmt: skip


def claims(module, cfg) -> str | None:
    """GPT-2 is the GPT with learned positions, LayerNorm with biases, a non-gated FFN and full attention."""
    if not isinstance(cfg, GPTConfig):
        return None
    b = cfg.block
    plain = (cfg.position == "learned" and b.norm == "layernorm" and b.attention_bias and b.mlp_bias
             and b.activation in ("gelu_tanh", "gelu", "relu", "silu") and b.num_kv_heads in (None, b.num_heads)
             and b.head_dim in (None, b.d_model // b.num_heads) and b.attention == "full" and not b.num_experts
             and b.attention_scale in (None, 1.0))  # fmt: skip
    return "GPT2LMHeadModel" if plain else None


ARCHITECTURE = Architecture(("GPT2LMHeadModel",), to_tfm, to_params, from_params, to_hf, claims)
