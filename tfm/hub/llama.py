"""Llama, Mistral and Mixtral (``*ForCausalLM``) <-> ``tfm.models.GPT`` with RoPE, RMSNorm and SwiGLU.

The three share one layout: ``model.embed_tokens``, per layer ``self_attn.{q,k,v,o}_proj`` (torch
``nn.Linear``, ``[out, in]``, grouped key/value heads), ``input_layernorm`` and
``post_attention_layernorm`` (RMSNorm scales), ``model.norm`` and ``lm_head`` (absent when tied).
The FFN is ``mlp.{gate,up,down}_proj`` (SwiGLU), or for Mixtral a top-k MoE ``block_sparse_moe``
with a router ``gate`` and experts ``w1`` (gate), ``w3`` (up), ``w2`` (down); the fused layout of
newer ``transformers`` (``mlp.experts.gate_up_proj [E, 2F, D]``, ``mlp.experts.down_proj [E, D, F]``)
is read as well. Hugging Face's query/key projections are already in the rotate-half RoPE layout
of ``tfm.layers.position.apply_rope``, so no permutation is needed.

Mistral's ``sliding_window`` w lets query t see keys s with ``t - w < s <= t``: tfm's ``local``
attention with ``attention_window=w``, exactly. Mixtral's router (softmax over all experts, top-k,
renormalised) is tfm's ``route`` with ``moe_renormalize=True``; dispatch is dropless, as in Mixtral.
"""

from __future__ import annotations

import numpy as np

from tfm.hub.convert import Architecture, Flat, HubError, heads_in, heads_out, refuse, take
from tfm.models.gpt import GPT, GPTConfig

LLAMA, MISTRAL, MIXTRAL = "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM"
MODEL_TYPES = {LLAMA: "llama", MISTRAL: "mistral", MIXTRAL: "mixtral"}
DEFAULT_THETA = {LLAMA: 10_000.0, MISTRAL: 10_000.0, MIXTRAL: 1_000_000.0}  # transformers' defaults per config class
DEFAULT_EPS = {LLAMA: 1e-6, MISTRAL: 1e-6, MIXTRAL: 1e-5}
DEFAULT_MAX_LEN = {LLAMA: 2048, MISTRAL: 4096 * 32, MIXTRAL: 4096 * 32}
ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu"}  # hidden_act of the gated FFN -> tfm's gated activation
GATED_MLP = (("gate_proj", "wi_0"), ("up_proj", "wi_1"), ("down_proj", "wo"))
EXPERTS = (("w1", "wi_0"), ("w3", "wi_1"), ("w2", "wo"))

_BASE = GPTConfig().replace(
    position="rope", norm="rmsnorm", activation="swiglu", norm_position="pre", attention_bias=False, mlp_bias=False,
    tie_embeddings=False, scale_residual_init=False, dropout_rate=0.0, attention_dropout_rate=0.0,
)  # fmt: skip


def rope_theta(hf: dict, arch: str) -> float:
    """The RoPE base of a config, refusing every RoPE type but the default (``rope_parameters`` or the older
    ``rope_scaling`` / ``rope_theta`` keys, with transformers' precedence)."""
    src = f"{arch} config"
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if any(isinstance(v, dict) for v in params.values()):
        raise HubError(f"{src}: rope_parameters per layer type ({sorted(params)}) are not implemented in tfm")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise HubError(f"{src}: RoPE scaling rope_type={kind!r} is not implemented in tfm (supported: ('default',))")
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        raise HubError(f"{src}: partial_rotary_factor={partial!r} is not implemented in tfm (supported: (1.0,))")
    return float(params.get("rope_theta", hf.get("rope_theta", DEFAULT_THETA[arch])))


def to_tfm(hf: dict, arch: str) -> tuple[type, GPTConfig]:
    src = f"{arch} config"
    # pretraining_tp > 1 only splits the projections' matmuls in older transformers: the same function.
    refuse(hf, src, router_jitter_noise=(0, 0.0, None))  # training-time router noise, which tfm does not have
    act = hf.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise HubError(f"{src}: hidden_act={act!r} is not implemented in tfm (supported: {tuple(ACTIVATIONS)})")
    d, n = hf["hidden_size"], hf["num_attention_heads"]
    window = hf.get("sliding_window") if arch != LLAMA else None
    attention_dropout = float(hf.get("attention_dropout") or 0.0)
    if window is not None and attention_dropout:
        raise HubError(f"{src}: attention_dropout={attention_dropout} with sliding_window={window} is not implemented "
                       f"in tfm (its local attention has no weight dropout)")  # fmt: skip
    biases = arch == LLAMA
    cfg = _BASE.replace(
        vocab_size=hf["vocab_size"], max_len=hf.get("max_position_embeddings", DEFAULT_MAX_LEN[arch]),
        num_layers=hf["num_hidden_layers"], d_model=d, num_heads=n, num_kv_heads=hf.get("num_key_value_heads") or n,
        head_dim=hf.get("head_dim") or None, d_ff=hf["intermediate_size"], activation=ACTIVATIONS[act],
        norm_epsilon=hf.get("rms_norm_eps", DEFAULT_EPS[arch]), rope_base=rope_theta(hf, arch),
        attention_bias=biases and bool(hf.get("attention_bias", False)),
        mlp_bias=biases and bool(hf.get("mlp_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), init_std=hf.get("initializer_range", 0.02),
        attention_dropout_rate=attention_dropout,
        **(dict(attention="local", attention_window=window) if window is not None else {}),
    )  # fmt: skip
    if cfg.block.head_dim == d // n:
        cfg = cfg.replace(head_dim=None)
    if arch == MIXTRAL:
        # Training-only terms: transformers' load-balancing loss sums over the k choices where tfm averages.
        k = hf.get("num_experts_per_tok", 2)
        cfg = cfg.replace(
            num_experts=hf.get("num_local_experts", 8), experts_per_token=k, moe_every=1, moe_dispatch="dropless",
            moe_renormalize=True, load_balance_weight=hf.get("router_aux_loss_coef", 0.001) * k, router_z_weight=0.0,
        )  # fmt: skip
    return GPT, cfg


def _linear_in(w: np.ndarray) -> np.ndarray:
    """A torch ``nn.Linear`` weight ``[out, in]`` as a tfm kernel ``[in, out]``."""
    return np.ascontiguousarray(w.T)


def to_params(tensors: Flat, cfg: GPTConfig, arch: str) -> Flat:
    t = dict(tensors)
    b, src = cfg.block, arch
    get = lambda name: take(t, name, src)  # noqa: E731
    out: Flat = {"embed/embedding": get("model.embed_tokens.weight"),
                 "decoder/final_norm/scale": get("model.norm.weight")}  # fmt: skip
    for i in range(cfg.num_layers):
        h, o = f"model.layers.{i}.", f"decoder/layers_{i}/"
        for name, tfm_name, heads in (("q", "query", b.num_heads), ("k", "key", b.kv_heads),
                                      ("v", "value", b.kv_heads)):  # fmt: skip
            kernel = _linear_in(get(h + f"self_attn.{name}_proj.weight"))
            out[o + f"self_attention/{tfm_name}/kernel"] = heads_in(kernel, heads)
            if b.attention_bias:
                out[o + f"self_attention/{tfm_name}/bias"] = get(h + f"self_attn.{name}_proj.bias").reshape(heads, -1)
        out[o + "self_attention/out/kernel"] = heads_out(_linear_in(get(h + "self_attn.o_proj.weight")), b.num_heads)
        if b.attention_bias:
            out[o + "self_attention/out/bias"] = get(h + "self_attn.o_proj.bias")
        out[o + "attention_norm/scale"] = get(h + "input_layernorm.weight")
        out[o + "mlp_norm/scale"] = get(h + "post_attention_layernorm.weight")
        if b.num_experts:
            out.update(_experts_in(t, h, o + "moe/", b.num_experts, src))
            continue
        for hf_name, tfm_name in GATED_MLP:
            out[o + f"mlp/{tfm_name}/kernel"] = _linear_in(get(h + f"mlp.{hf_name}.weight"))
            if b.mlp_bias:
                out[o + f"mlp/{tfm_name}/bias"] = get(h + f"mlp.{hf_name}.bias")
    head = t.pop("lm_head.weight", None)  # tied: the same values as embed_tokens when present
    if not cfg.tie_embeddings:
        if head is None:
            raise HubError(f"{src}: tie_word_embeddings=False but the checkpoint has no lm_head.weight")
        out["lm_head/kernel"] = _linear_in(head)
    t = {k: v for k, v in t.items() if not k.endswith("rotary_emb.inv_freq")}  # a buffer in older checkpoints
    if t:
        raise HubError(f"{src}: tensors tfm does not map: {sorted(t)[:4]}")
    return out


def _experts_in(t: Flat, h: str, o: str, e: int, src: str) -> Flat:
    """A Mixtral MoE layer: per-expert ``block_sparse_moe.experts.{j}.w{1,2,3}`` or the fused ``mlp.experts``."""
    if h + "mlp.experts.gate_up_proj" in t:
        gate_up = take(t, h + "mlp.experts.gate_up_proj", src)  # [E, 2F, D]: gate rows, then up rows
        gate, up = np.split(gate_up, 2, axis=1)
        down = take(t, h + "mlp.experts.down_proj", src)  # [E, D, F]
        return {o + "router": _linear_in(take(t, h + "mlp.gate.weight", src)), o + "wi_0": gate.transpose(0, 2, 1),
                o + "wi_1": up.transpose(0, 2, 1), o + "wo": down.transpose(0, 2, 1)}  # fmt: skip
    m = h + "block_sparse_moe."
    out = {o + "router": _linear_in(take(t, m + "gate.weight", src))}
    for hf_name, tfm_name in EXPERTS:
        out[o + tfm_name] = np.stack([_linear_in(take(t, m + f"experts.{j}.{hf_name}.weight", src)) for j in range(e)])
    return out


def from_params(flat: Flat, cfg: GPTConfig, arch: str) -> Flat:
    p, b = flat, cfg.block
    out: Flat = {"model.embed_tokens.weight": p["embed/embedding"], "model.norm.weight": p["decoder/final_norm/scale"]}
    for i in range(cfg.num_layers):
        h, o = f"model.layers.{i}.", f"decoder/layers_{i}/"
        a = o + "self_attention/"
        for name, tfm_name in (("q", "query"), ("k", "key"), ("v", "value")):
            kernel = p[a + f"{tfm_name}/kernel"]
            out[h + f"self_attn.{name}_proj.weight"] = _linear_in(kernel.reshape(kernel.shape[0], -1))
            if b.attention_bias:
                out[h + f"self_attn.{name}_proj.bias"] = p[a + f"{tfm_name}/bias"].reshape(-1)
        kernel = p[a + "out/kernel"]
        out[h + "self_attn.o_proj.weight"] = _linear_in(kernel.reshape(-1, kernel.shape[-1]))
        if b.attention_bias:
            out[h + "self_attn.o_proj.bias"] = p[a + "out/bias"]
        out[h + "input_layernorm.weight"] = p[o + "attention_norm/scale"]
        out[h + "post_attention_layernorm.weight"] = p[o + "mlp_norm/scale"]
        if b.num_experts:
            m = h + "block_sparse_moe."
            out[m + "gate.weight"] = _linear_in(p[o + "moe/router"])
            for hf_name, tfm_name in EXPERTS:
                for j, w in enumerate(p[o + f"moe/{tfm_name}"]):
                    out[m + f"experts.{j}.{hf_name}.weight"] = _linear_in(w)
            continue
        for hf_name, tfm_name in GATED_MLP:
            out[h + f"mlp.{hf_name}.weight"] = _linear_in(p[o + f"mlp/{tfm_name}/kernel"])
            if b.mlp_bias:
                out[h + f"mlp.{hf_name}.bias"] = p[o + f"mlp/{tfm_name}/bias"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = _linear_in(p["lm_head/kernel"])
    return out


def to_hf(cfg: GPTConfig, arch: str) -> dict:
    b = cfg.block
    hf = {
        "architectures": [arch], "model_type": MODEL_TYPES[arch], "vocab_size": cfg.vocab_size,
        "hidden_size": b.d_model, "intermediate_size": (b.expert_d_ff or b.d_ff) if b.num_experts else b.d_ff,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": b.num_heads, "num_key_value_heads": b.kv_heads,
        "head_dim": b.head_width, "hidden_act": "silu", "rms_norm_eps": b.norm_epsilon,
        "max_position_embeddings": cfg.max_len, "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std, "attention_dropout": b.attention_dropout_rate,
        "rope_parameters": {"rope_type": "default", "rope_theta": b.rope_base},
    }  # fmt: skip
    if arch == LLAMA:
        hf.update(attention_bias=b.attention_bias, mlp_bias=b.mlp_bias, pretraining_tp=1)
    else:
        hf["sliding_window"] = b.attention_window if b.attention == "local" else None
    if arch == MIXTRAL:
        hf.update(num_local_experts=b.num_experts, num_experts_per_tok=b.experts_per_token, router_jitter_noise=0.0,
                  router_aux_loss_coef=b.load_balance_weight / b.experts_per_token)  # fmt: skip
    return hf


def claims(module, cfg) -> str | None:
    """Mixtral for a Llama-style GPT whose every FFN is a renormalised top-k SwiGLU MoE without biases; Mistral
    for a sliding window (local attention) without biases; Llama for full attention. GPT-2's learned positions
    and LayerNorm are never claimed."""
    if not isinstance(cfg, GPTConfig):
        return None
    b = cfg.block
    llama_like = (cfg.position == "rope" and b.norm == "rmsnorm" and b.norm_position == "pre"
                  and b.activation == "swiglu" and b.attention_scale is None and b.head_width % 2 == 0)  # fmt: skip
    if not llama_like:
        return None
    biases = b.attention_bias or b.mlp_bias
    if b.num_experts:
        moe = b.moe_every == 1 and b.moe_renormalize and not biases and b.attention in ("full", "flash", "local")
        return MIXTRAL if moe else None
    if b.attention == "local":
        return None if biases else MISTRAL
    if b.attention in ("full", "flash"):
        if b.d_model % b.num_heads == 0:  # transformers' LlamaConfig requires it, even with head_dim set
            return LLAMA
        return None if biases else MISTRAL
    return None


ARCHITECTURE = Architecture((LLAMA, MISTRAL, MIXTRAL), to_tfm, to_params, from_params, to_hf, claims)
