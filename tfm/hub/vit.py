"""ViT (``ViTForImageClassification``) <-> ``tfm.models.ViT``: pre-LN encoder over patches, class token.

Hugging Face's patch embedding is a stride-P convolution, weight ``[D, C, P, P]`` (out, in, kh, kw);
tfm's ``patch_embed`` kernel is ``[P, P, C, D]`` over patches in the same row-major order. Hugging Face
takes ``pixel_values`` ``[B, C, H, W]``, tfm ``images`` ``[B, H, W, C]``: transpose the inputs, not the
weights. ``encoder_stride``, ``pooler_output_size`` and ``pooler_act`` describe heads the classifier
does not have and are ignored.
"""

from __future__ import annotations

from tfm.hub.bert import HF_ACTIVATIONS, activation, layer_from_tfm, layer_to_tfm, num_labels
from tfm.hub.convert import Architecture, Flat, HubError, refuse, take
from tfm.models.vit import ViT, ViTConfig, vit_b16

ARCH = "ViTForImageClassification"
ATTENTION = (("attention.attention.query", "query"), ("attention.attention.key", "key"),
             ("attention.attention.value", "value"))  # fmt: skip
DENSE = (("intermediate.dense", "mlp/wi"), ("output.dense", "mlp/wo"))
NORMS = (("layernorm_before", "attention_norm"), ("layernorm_after", "mlp_norm"))
LAYOUT = (ATTENTION, DENSE, NORMS)


def _square(hf: dict, key: str, default: int, src: str) -> int:
    value = hf.get(key, default)
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise HubError(f"{src}: {key}={value!r} is not implemented in tfm (square only)")
        value = value[0]
    return int(value)


def to_tfm(hf: dict, arch: str) -> tuple[type, ViTConfig]:
    src = f"{arch} config"
    refuse(hf, src, qkv_bias=True, use_mask_token=False)  # tfm's attention has biases on all or none
    labels = num_labels(hf)
    if labels < 1:
        raise HubError(f"{src}: num_labels={labels} (no classifier) is not implemented in tfm")
    d, n = hf["hidden_size"], hf["num_attention_heads"]
    if d % n:
        raise HubError(f"{src}: hidden_size={d} is not a multiple of num_attention_heads={n}")
    cfg = vit_b16.replace(
        image_size=_square(hf, "image_size", 224, src), patch_size=_square(hf, "patch_size", 16, src),
        num_channels=hf.get("num_channels", 3), num_layers=hf["num_hidden_layers"], num_classes=labels,
        d_model=d, num_heads=n, d_ff=hf["intermediate_size"], activation=activation(hf, "hidden_act", src),
        norm_epsilon=hf.get("layer_norm_eps", 1e-12), dropout_rate=hf.get("hidden_dropout_prob", 0.0),
        attention_dropout_rate=hf.get("attention_probs_dropout_prob", 0.0),
    )  # fmt: skip
    return ViT, cfg


def to_params(tensors: Flat, cfg: ViTConfig, arch: str) -> Flat:
    t = {k.removeprefix("vit."): v for k, v in tensors.items()}
    src, n = arch, cfg.block.num_heads
    get = lambda name: take(t, name, src)  # noqa: E731
    out: Flat = {}

    def dense(hf_name: str, tfm_name: str) -> None:  # nn.Linear [out, in] -> Einsum [in, out]
        out[f"{tfm_name}/kernel"], out[f"{tfm_name}/bias"] = get(f"{hf_name}.weight").T, get(f"{hf_name}.bias")

    def norm(hf_name: str, tfm_name: str) -> None:
        out[f"{tfm_name}/scale"], out[f"{tfm_name}/bias"] = get(f"{hf_name}.weight"), get(f"{hf_name}.bias")

    out["cls"] = get("embeddings.cls_token")
    out["pos_embed/embedding"] = get("embeddings.position_embeddings")[0]
    out["patch_embed/kernel"] = get("embeddings.patch_embeddings.projection.weight").transpose(2, 3, 1, 0)
    out["patch_embed/bias"] = get("embeddings.patch_embeddings.projection.bias")
    for i in range(cfg.num_layers):
        out.update(layer_to_tfm(get, f"encoder.layer.{i}.", f"encoder/layers_{i}/", n, LAYOUT))
    norm("layernorm", "encoder/final_norm")
    dense("classifier", "head")
    for name in ("pooler.dense.weight", "pooler.dense.bias"):
        t.pop(name, None)  # a ViTModel's pooler, which the classifier does not read (Hugging Face drops it too)
    if t:
        raise HubError(f"{src}: tensors tfm does not map: {sorted(t)[:4]}")
    return out


def from_params(flat: Flat, cfg: ViTConfig, arch: str) -> Flat:
    p, d = flat, cfg.block.d_model
    out: Flat = {}

    def dense(hf_name: str, tfm_name: str) -> None:
        out[f"{hf_name}.weight"], out[f"{hf_name}.bias"] = p[f"{tfm_name}/kernel"].T, p[f"{tfm_name}/bias"]

    def norm(hf_name: str, tfm_name: str) -> None:
        out[f"{hf_name}.weight"], out[f"{hf_name}.bias"] = p[f"{tfm_name}/scale"], p[f"{tfm_name}/bias"]

    out["vit.embeddings.cls_token"] = p["cls"]
    out["vit.embeddings.position_embeddings"] = p["pos_embed/embedding"][None]
    out["vit.embeddings.patch_embeddings.projection.weight"] = p["patch_embed/kernel"].transpose(3, 2, 0, 1)
    out["vit.embeddings.patch_embeddings.projection.bias"] = p["patch_embed/bias"]
    for i in range(cfg.num_layers):
        out.update(layer_from_tfm(p, f"vit.encoder.layer.{i}.", f"encoder/layers_{i}/", d, LAYOUT))
    norm("vit.layernorm", "encoder/final_norm")
    dense("classifier", "head")
    return out


def to_hf(cfg: ViTConfig, arch: str) -> dict:
    b = cfg.block
    return {
        "architectures": [arch], "model_type": "vit", "hidden_size": b.d_model, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": b.num_heads, "intermediate_size": b.d_ff, "hidden_act": HF_ACTIVATIONS[b.activation],
        "hidden_dropout_prob": b.dropout_rate, "attention_probs_dropout_prob": b.attention_dropout_rate,
        "layer_norm_eps": b.norm_epsilon, "image_size": cfg.image_size, "patch_size": cfg.patch_size,
        "num_channels": cfg.num_channels, "qkv_bias": True, "initializer_range": 0.02,
        "id2label": {str(i): f"LABEL_{i}" for i in range(cfg.num_classes)},
        "label2id": {f"LABEL_{i}": i for i in range(cfg.num_classes)},
    }  # fmt: skip


def claims(module, cfg) -> str | None:
    """The plain ViT: raw-pixel patches, class-token pooling, pre-LN LayerNorm layers with biases, full attention."""
    if not isinstance(cfg, ViTConfig):
        return None
    b = cfg.block
    plain = (not cfg.stem_channels and cfg.pool == "cls" and b.norm == "layernorm" and b.norm_position == "pre"
             and b.attention_bias and b.mlp_bias and b.activation in HF_ACTIVATIONS
             and b.num_kv_heads in (None, b.num_heads) and b.head_dim in (None, b.d_model // b.num_heads)
             and b.attention == "full" and not b.num_experts and b.attention_scale is None
             and not b.use_rope)  # fmt: skip
    return ARCH if plain else None


ARCHITECTURE = Architecture((ARCH,), to_tfm, to_params, from_params, to_hf, claims)
