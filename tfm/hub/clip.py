"""CLIP (``CLIPModel``) <-> ``tfm.models.CLIP``: a pre-LN image tower and a causal text tower, both projected
(without biases) into one feature space, and a learned logit scale.

The image tower: a stride-P convolution without bias, weight ``[D, C, P, P]`` (tfm's ``patch_embed``
``[P, P, C, D]``), the class token, learned positions, then Hugging Face's ``pre_layrnorm`` (tfm's
``pre_norm``); its ``post_layernorm`` of the class token is the image stack's final LayerNorm in tfm (a
LayerNorm acts per position, so normalising every position and taking the class token is the same).
Hugging Face takes ``pixel_values`` ``[B, C, H, W]``, tfm ``images`` ``[B, H, W, C]``. The text tower's
``final_layer_norm`` is the text stack's final LayerNorm.

Text pooling: tfm reads each row's state at its first ``eot_id`` token. transformers reads it at the first
``eos_token_id``, except for ``eos_token_id=2`` (configs written before the fix), where it takes the
position of the row's largest id, i.e. the first ``vocab_size - 1`` (CLIP's EOT is the last id): tfm then
imports ``eot_id = vocab_size - 1``. Both assume every row holds an EOT, as CLIP's tokenizer writes it (a
row without one: tfm reads its last position, transformers its first). tfm's text tower masks no padding:
pads after the EOT cannot change its state under the causal mask, so ``attention_mask`` is not needed.

tfm's towers share one block config: the text and vision ``hidden_act``, ``layer_norm_eps`` and
``attention_dropout`` must agree. tfm caps ``exp(logit_scale)`` at ``max_logit_scale`` (100, as CLIP's
training clamps it); transformers does not, so a checkpoint whose scale is above that (beyond float32
rounding of ln 100, which OpenAI's store) is refused unless ``max_logit_scale`` is raised to fit it.
"""

from __future__ import annotations

import numpy as np

from tfm.hub.bert import ACTIVATIONS as BERT_ACTIVATIONS
from tfm.hub.bert import HF_ACTIVATIONS as BERT_HF_ACTIVATIONS
from tfm.hub.convert import Architecture, Flat, HubError, layer_from_tfm, layer_to_tfm, take
from tfm.models.clip import CLIP, CLIPConfig, clip_vit_b32

ARCH = "CLIPModel"
ACTIVATIONS = {**BERT_ACTIVATIONS, "quick_gelu": "quick_gelu"}
HF_ACTIVATIONS = {**BERT_HF_ACTIVATIONS, "quick_gelu": "quick_gelu"}
LEGACY_EOS = 2  # transformers pools at argmax(ids) for this eos_token_id
_LAYER = (("self_attn", "self_attention"), ("layer_norm1", "attention_norm"), ("mlp.fc1", "mlp/wi"),
          ("mlp.fc2", "mlp/wo"), ("layer_norm2", "mlp_norm"))  # fmt: skip
# transformers' defaults for keys a config.json leaves out (CLIPTextConfig, CLIPVisionConfig).
TEXT = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
            max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0,
            eos_token_id=49407)  # fmt: skip
VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
              image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
              attention_dropout=0.0)  # fmt: skip


def _towers(hf: dict) -> tuple[dict, dict]:
    """The text and vision configs as transformers reads them (``*_config_dict`` of old configs wins)."""
    text = hf.get("text_config_dict") or hf.get("text_config") or {}
    vision = hf.get("vision_config_dict") or hf.get("vision_config") or {}
    return {**TEXT, **text}, {**VISION, **vision}


def _size(tower: dict, key: str, src: str) -> int:
    value = tower[key]
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise HubError(f"{src}: vision_config.{key}={value!r} is not implemented in tfm (square only)")
        value = value[0]
    return int(value)


def to_tfm(hf: dict, arch: str) -> tuple[type, CLIPConfig]:
    src = f"{arch} config"
    text, vision = _towers(hf)
    for key in ("hidden_act", "layer_norm_eps", "attention_dropout"):
        if text[key] != vision[key]:
            raise HubError(f"{src}: vision_config.{key}={vision[key]!r} differs from text_config.{key}={text[key]!r}; "
                           f"tfm's towers share one")  # fmt: skip
    act = text["hidden_act"]
    if act not in ACTIVATIONS:
        raise HubError(f"{src}: hidden_act={act!r} is not implemented in tfm (supported: {tuple(ACTIVATIONS)})")
    for name, tower in (("text_config", text), ("vision_config", vision)):
        d, n = tower["hidden_size"], tower["num_attention_heads"]
        if d % n:
            raise HubError(f"{src}: {name}.hidden_size={d} is not a multiple of num_attention_heads={n}")
    vocab, eos = text["vocab_size"], text["eos_token_id"]
    if isinstance(eos, list) or eos is None or not 0 <= eos < vocab:
        raise HubError(f"{src}: text_config.eos_token_id={eos!r} is not implemented in tfm "
                       f"(one EOT token of the vocabulary of {vocab})")  # fmt: skip
    image, patch = _size(vision, "image_size", src), _size(vision, "patch_size", src)
    if image % patch:
        raise HubError(f"{src}: vision_config.image_size={image} is not divisible by patch_size={patch}")
    cfg = clip_vit_b32.replace(
        embed_dim=hf.get("projection_dim", 512), vocab_size=vocab, max_len=text["max_position_embeddings"],
        text_layers=text["num_hidden_layers"], eot_id=vocab - 1 if eos == LEGACY_EOS else eos, image_size=image,
        patch_size=patch, num_channels=vision["num_channels"], vision_layers=vision["num_hidden_layers"],
        vision_d_model=vision["hidden_size"], vision_num_heads=vision["num_attention_heads"],
        vision_d_ff=vision["intermediate_size"], logit_scale_init=float(hf.get("logit_scale_init_value", 2.6592)),
        d_model=text["hidden_size"], num_heads=text["num_attention_heads"], d_ff=text["intermediate_size"],
        activation=ACTIVATIONS[act], norm_epsilon=text["layer_norm_eps"], dropout_rate=0.0,
        attention_dropout_rate=text["attention_dropout"],
    )  # fmt: skip
    return CLIP, cfg


def to_params(tensors: Flat, cfg: CLIPConfig, arch: str) -> Flat:
    t = dict(tensors)
    src = arch
    get = lambda name: take(t, name, src)  # noqa: E731
    out: Flat = {}

    def norm(hf_name: str, tfm_name: str) -> None:
        out[f"{tfm_name}/scale"], out[f"{tfm_name}/bias"] = get(f"{hf_name}.weight"), get(f"{hf_name}.bias")

    v, x = "vision_model.", "text_model."
    out["image_tower/cls"] = get(v + "embeddings.class_embedding")
    out["image_tower/patch_embed/kernel"] = get(v + "embeddings.patch_embedding.weight").transpose(2, 3, 1, 0)
    out["image_tower/pos_embed/embedding"] = get(v + "embeddings.position_embedding.weight")
    norm(v + "pre_layrnorm", "image_tower/pre_norm")
    for i in range(cfg.vision_layers):
        h, o = f"{v}encoder.layers.{i}.", f"image_tower/encoder/layers_{i}/"
        out.update(layer_to_tfm(get, h, o, cfg.vision_num_heads, _LAYER))
    norm(v + "post_layernorm", "image_tower/encoder/final_norm")
    out["text_tower/embed/embedding"] = get(x + "embeddings.token_embedding.weight")
    out["text_tower/pos_embed/embedding"] = get(x + "embeddings.position_embedding.weight")
    for i in range(cfg.text_layers):
        h, o = f"{x}encoder.layers.{i}.", f"text_tower/encoder/layers_{i}/"
        out.update(layer_to_tfm(get, h, o, cfg.block.num_heads, _LAYER))
    norm(x + "final_layer_norm", "text_tower/encoder/final_norm")
    out["image_projection/kernel"] = get("visual_projection.weight").T  # nn.Linear [out, in] -> Einsum [in, out]
    out["text_projection/kernel"] = get("text_projection.weight").T
    out["logit_scale"] = np.asarray(get("logit_scale"), np.float32).reshape(())
    for name in (v + "embeddings.position_ids", x + "embeddings.position_ids"):
        t.pop(name, None)  # buffers of old checkpoints
    if t:
        raise HubError(f"{src}: tensors tfm does not map: {sorted(t)[:4]}")
    scale = float(np.exp(out["logit_scale"]))
    if scale > cfg.max_logit_scale * (1 + 1e-4):
        raise HubError(f"{src}: exp(logit_scale)={scale:.6g} exceeds max_logit_scale={cfg.max_logit_scale} "
                       f"(tfm caps the scale there, transformers does not); "
                       f"load it with max_logit_scale={scale:.6g}")  # fmt: skip
    return out


def from_params(flat: Flat, cfg: CLIPConfig, arch: str) -> Flat:
    p = flat
    out: Flat = {}

    def norm(hf_name: str, tfm_name: str) -> None:
        out[f"{hf_name}.weight"], out[f"{hf_name}.bias"] = p[f"{tfm_name}/scale"], p[f"{tfm_name}/bias"]

    v, x = "vision_model.", "text_model."
    out[v + "embeddings.class_embedding"] = p["image_tower/cls"]
    out[v + "embeddings.patch_embedding.weight"] = p["image_tower/patch_embed/kernel"].transpose(3, 2, 0, 1)
    out[v + "embeddings.position_embedding.weight"] = p["image_tower/pos_embed/embedding"]
    norm(v + "pre_layrnorm", "image_tower/pre_norm")
    for i in range(cfg.vision_layers):
        h, o = f"{v}encoder.layers.{i}.", f"image_tower/encoder/layers_{i}/"
        out.update(layer_from_tfm(p, h, o, cfg.vision_d_model, _LAYER))
    norm(v + "post_layernorm", "image_tower/encoder/final_norm")
    out[x + "embeddings.token_embedding.weight"] = p["text_tower/embed/embedding"]
    out[x + "embeddings.position_embedding.weight"] = p["text_tower/pos_embed/embedding"]
    for i in range(cfg.text_layers):
        h, o = f"{x}encoder.layers.{i}.", f"text_tower/encoder/layers_{i}/"
        out.update(layer_from_tfm(p, h, o, cfg.block.d_model, _LAYER))
    norm(x + "final_layer_norm", "text_tower/encoder/final_norm")
    out["visual_projection.weight"] = p["image_projection/kernel"].T
    out["text_projection.weight"] = p["text_projection/kernel"].T
    out["logit_scale"] = np.asarray(p["logit_scale"]).reshape(())
    return {k: np.asarray(a, order="C") for k, a in out.items()}  # logit_scale stays a scalar


def _legacy_pooling(cfg: CLIPConfig) -> bool:
    """An ``eot_id`` transformers would read as the legacy ``eos_token_id=2`` (argmax pooling), which is the
    first-EOT rule only when 2 is the largest id."""
    return cfg.eot_id == LEGACY_EOS and cfg.vocab_size - 1 != LEGACY_EOS


def to_hf(cfg: CLIPConfig, arch: str) -> dict:
    if _legacy_pooling(cfg):
        raise HubError(f"{arch}: eot_id={LEGACY_EOS} is read by transformers as its legacy argmax pooling, "
                       f"not the first EOT token: tfm cannot export this CLIP")  # fmt: skip
    b = cfg.block
    shared = dict(hidden_act=HF_ACTIVATIONS[b.activation], layer_norm_eps=b.norm_epsilon,
                  attention_dropout=b.attention_dropout_rate, projection_dim=cfg.embed_dim, initializer_range=0.02,
                  initializer_factor=1.0)  # fmt: skip
    # tfm's CLIP knows no start or pad token (the model reads neither): the tokenizer's own files name them.
    text = dict(model_type="clip_text_model", vocab_size=cfg.vocab_size, hidden_size=b.d_model,
                intermediate_size=b.d_ff, num_hidden_layers=cfg.text_layers, num_attention_heads=b.num_heads,
                max_position_embeddings=cfg.max_len, eos_token_id=cfg.eot_id, bos_token_id=None, pad_token_id=None,
                **shared)  # fmt: skip
    vision = dict(model_type="clip_vision_model", hidden_size=cfg.vision_d_model, intermediate_size=cfg.vision_d_ff,
                  num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_num_heads,
                  num_channels=cfg.num_channels, image_size=cfg.image_size, patch_size=cfg.patch_size,
                  **shared)  # fmt: skip
    return {"architectures": [arch], "model_type": "clip", "projection_dim": cfg.embed_dim,
            "logit_scale_init_value": cfg.logit_scale_init, "initializer_factor": 1.0, "text_config": text,
            "vision_config": vision}  # fmt: skip


def claims(module, cfg) -> str | None:
    """CLIP's towers: pre-LN LayerNorm layers with biases everywhere, a plain FFN, full softmax attention."""
    if not isinstance(cfg, CLIPConfig):
        return None
    b = cfg.block
    plain = (b.norm == "layernorm" and b.norm_position == "pre" and b.attention_bias and b.key_bias and b.mlp_bias
             and b.activation in HF_ACTIVATIONS and b.num_kv_heads in (None, b.num_heads)
             and b.head_dim in (None, b.d_model // b.num_heads) and b.attention == "full" and not b.num_experts
             and b.attention_scale is None and not b.use_rope and not _legacy_pooling(cfg))  # fmt: skip
    return ARCH if plain else None


ARCHITECTURE = Architecture((ARCH,), to_tfm, to_params, from_params, to_hf, claims)
