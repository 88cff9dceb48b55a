"""BERT (``BertModel``, ``BertForMaskedLM``, ``BertForSequenceClassification``, ``BertForQuestionAnswering``)
<-> ``tfm.models.bert``: post-LN encoder layers, learned positions, token types.

torch ``nn.Linear`` weights are ``[out, in]``; tfm's kernels ``[in, out]`` (attention heads split out).
Hugging Face builds the masked-LM and question-answering models without the pooler; tfm
imports them with ``pooler=False`` and exports only the tensors Hugging Face has (a tfm
masked-LM model with a pooler leaves it behind: the MLM logits never read it). The MLM
output layer is tied to the token embedding on both sides. Padding: tfm masks the keys of
tokens equal to ``pad_id`` (Hugging Face's ``pad_token_id``; none: ``pad_id=-1``), where
Hugging Face takes an ``attention_mask``.
"""

from __future__ import annotations

import numpy as np

from tfm.hub.convert import Architecture, Flat, HubError, heads_in, heads_out, refuse, take
from tfm.models.bert import (
    BertConfig,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertModel,
    bert_base,
)  # fmt: skip

MODULES = {"BertModel": BertModel, "BertForMaskedLM": BertForMaskedLM,
           "BertForSequenceClassification": BertForSequenceClassification,
           "BertForQuestionAnswering": BertForQuestionAnswering}  # fmt: skip
POOLED = ("BertModel", "BertForSequenceClassification")  # the Hugging Face models built with a pooler
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
               "silu": "silu", "swish": "silu"}  # fmt: skip
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}
# (Hugging Face name in a layer, tfm name): the four dense layers and the two LayerNorms of a layer.
ATTENTION = (("attention.self.query", "query"), ("attention.self.key", "key"), ("attention.self.value", "value"))
DENSE = (("intermediate.dense", "mlp/wi"), ("output.dense", "mlp/wo"))
NORMS = (("attention.output.LayerNorm", "attention_norm"), ("output.LayerNorm", "mlp_norm"))
LAYOUT = (ATTENTION, DENSE, NORMS)  # the names of one encoder layer's tensors (ViT has its own)


def layer_to_tfm(get, h: str, o: str, n: int, layout: tuple = LAYOUT) -> Flat:
    """One Hugging Face encoder layer (BERT's or ViT's ``layout``) under prefix ``h`` -> tfm's under ``o``."""
    attention, dense, norms = layout
    out: Flat = {}
    for hf_name, tfm_name in attention:
        out[o + f"self_attention/{tfm_name}/kernel"] = heads_in(get(h + f"{hf_name}.weight").T, n)
        out[o + f"self_attention/{tfm_name}/bias"] = get(h + f"{hf_name}.bias").reshape(n, -1)
    out[o + "self_attention/out/kernel"] = heads_out(get(h + "attention.output.dense.weight").T, n)
    out[o + "self_attention/out/bias"] = get(h + "attention.output.dense.bias")
    for hf_name, tfm_name in dense:  # nn.Linear [out, in] -> Einsum [in, out]
        out[o + f"{tfm_name}/kernel"] = get(h + f"{hf_name}.weight").T
        out[o + f"{tfm_name}/bias"] = get(h + f"{hf_name}.bias")
    for hf_name, tfm_name in norms:
        out[o + f"{tfm_name}/scale"] = get(h + f"{hf_name}.weight")
        out[o + f"{tfm_name}/bias"] = get(h + f"{hf_name}.bias")
    return out


def layer_from_tfm(p: Flat, h: str, o: str, d: int, layout: tuple = LAYOUT) -> Flat:
    """The inverse of ``layer_to_tfm``: tfm's layer under ``o`` -> Hugging Face tensors under ``h``."""
    attention, dense, norms = layout
    out: Flat = {}
    for hf_name, tfm_name in attention:
        out[h + f"{hf_name}.weight"] = p[o + f"self_attention/{tfm_name}/kernel"].reshape(d, -1).T
        out[h + f"{hf_name}.bias"] = p[o + f"self_attention/{tfm_name}/bias"].reshape(-1)
    out[h + "attention.output.dense.weight"] = p[o + "self_attention/out/kernel"].reshape(-1, d).T
    out[h + "attention.output.dense.bias"] = p[o + "self_attention/out/bias"]
    for hf_name, tfm_name in dense:
        out[h + f"{hf_name}.weight"] = p[o + f"{tfm_name}/kernel"].T
        out[h + f"{hf_name}.bias"] = p[o + f"{tfm_name}/bias"]
    for hf_name, tfm_name in norms:
        out[h + f"{hf_name}.weight"] = p[o + f"{tfm_name}/scale"]
        out[h + f"{hf_name}.bias"] = p[o + f"{tfm_name}/bias"]
    return out


def num_labels(hf: dict) -> int:
    """Hugging Face writes ``id2label`` (its length is the label count), or ``num_labels``, or neither (2)."""
    return len(hf["id2label"]) if hf.get("id2label") else int(hf.get("num_labels", 2))


def activation(hf: dict, key: str, src: str, default: str = "gelu") -> str:
    act = hf.get(key, default)
    if act not in ACTIVATIONS:
        raise HubError(f"{src}: {key}={act!r} is not implemented in tfm (supported: {tuple(ACTIVATIONS)})")
    return ACTIVATIONS[act]


def to_tfm(hf: dict, arch: str) -> tuple[type, BertConfig]:
    src = f"{arch} config"
    refuse(hf, src, position_embedding_type="absolute", is_decoder=False, add_cross_attention=False)
    dropout = hf.get("hidden_dropout_prob", 0.1)
    refuse(hf, src, classifier_dropout=(None, dropout))  # tfm's classifier drops at the layers' rate
    if arch == "BertForMaskedLM":
        refuse(hf, src, tie_word_embeddings=True)
    labels = num_labels(hf)
    if arch == "BertForQuestionAnswering" and labels != 2:
        raise HubError(f"{src}: num_labels={labels} is not implemented in tfm (the span head has 2 outputs)")
    d, n = hf["hidden_size"], hf["num_attention_heads"]
    if d % n:
        raise HubError(f"{src}: hidden_size={d} is not a multiple of num_attention_heads={n}")
    pad = hf.get("pad_token_id", 0)
    cfg = bert_base.replace(
        vocab_size=hf["vocab_size"], max_len=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2), num_layers=hf["num_hidden_layers"], d_model=d, num_heads=n,
        d_ff=hf["intermediate_size"], activation=activation(hf, "hidden_act", src),
        norm_epsilon=hf.get("layer_norm_eps", 1e-12), init_std=hf.get("initializer_range", 0.02),
        dropout_rate=dropout, attention_dropout_rate=hf.get("attention_probs_dropout_prob", 0.1),
        num_labels=labels, pad_id=-1 if pad is None else pad, pooler=arch in POOLED,
    )  # fmt: skip
    return MODULES[arch], cfg


def _rename(name: str) -> str:
    """Old checkpoints call the LayerNorm parameters gamma and beta (Hugging Face renames them on load)."""
    if ".LayerNorm." in name:
        return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    return name


def to_params(tensors: Flat, cfg: BertConfig, arch: str) -> Flat:
    t = {_rename(k).removeprefix("bert."): v for k, v in tensors.items()}
    src, n = arch, cfg.block.num_heads
    get = lambda name: take(t, name, src)  # noqa: E731
    base = "" if arch == "BertModel" else "bert/"
    out: Flat = {}

    def dense(hf_name: str, tfm_name: str) -> None:  # nn.Linear [out, in] -> Einsum [in, out]
        out[f"{tfm_name}/kernel"], out[f"{tfm_name}/bias"] = get(f"{hf_name}.weight").T, get(f"{hf_name}.bias")

    def norm(hf_name: str, tfm_name: str) -> None:
        out[f"{tfm_name}/scale"], out[f"{tfm_name}/bias"] = get(f"{hf_name}.weight"), get(f"{hf_name}.bias")

    for hf_name, tfm_name in (("word", "token_embed"), ("position", "pos_embed"), ("token_type", "type_embed")):
        out[f"{base}{tfm_name}/embedding"] = get(f"embeddings.{hf_name}_embeddings.weight")
    norm("embeddings.LayerNorm", base + "embed_norm")
    for i in range(cfg.num_layers):
        out.update(layer_to_tfm(get, f"encoder.layer.{i}.", f"{base}encoder/layers_{i}/", n))
    if cfg.pooler:
        dense("pooler.dense", base + "pooler")
    for name in ("pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids", "embeddings.token_type_ids"):
        t.pop(name, None)  # a pooler the model does not have (as Hugging Face drops it); buffers
    if arch == "BertForMaskedLM":
        dense("cls.predictions.transform.dense", "mlm_transform")
        norm("cls.predictions.transform.LayerNorm", "mlm_norm")
        out["mlm_bias"] = get("cls.predictions.bias")
        t.pop("cls.predictions.decoder.bias", None)  # the same tensor as cls.predictions.bias
        decoder = t.pop("cls.predictions.decoder.weight", None)
        if decoder is not None and not np.array_equal(decoder, out["bert/token_embed/embedding"]):
            raise HubError(f"{src}: cls.predictions.decoder.weight differs from the word embeddings (tfm ties them)")
        for name in ("cls.seq_relationship.weight", "cls.seq_relationship.bias"):
            t.pop(name, None)  # the next-sentence head of a pre-training checkpoint, unused by the MLM
    elif arch == "BertForSequenceClassification":
        dense("classifier", "classifier")
    elif arch == "BertForQuestionAnswering":
        dense("qa_outputs", "qa_outputs")
    if t:
        raise HubError(f"{src}: tensors tfm does not map: {sorted(t)[:4]}")
    return out


def from_params(flat: Flat, cfg: BertConfig, arch: str) -> Flat:
    p = flat
    base = "bert/" if any(k.startswith("bert/") for k in p) else ""  # a head model's backbone, or a BertModel
    pre = "" if arch == "BertModel" else "bert."
    out: Flat = {}

    def dense(hf_name: str, tfm_name: str) -> None:
        out[f"{hf_name}.weight"], out[f"{hf_name}.bias"] = p[f"{tfm_name}/kernel"].T, p[f"{tfm_name}/bias"]

    def norm(hf_name: str, tfm_name: str) -> None:
        out[f"{hf_name}.weight"], out[f"{hf_name}.bias"] = p[f"{tfm_name}/scale"], p[f"{tfm_name}/bias"]

    for hf_name, tfm_name in (("word", "token_embed"), ("position", "pos_embed"), ("token_type", "type_embed")):
        out[f"{pre}embeddings.{hf_name}_embeddings.weight"] = p[f"{base}{tfm_name}/embedding"]
    norm(pre + "embeddings.LayerNorm", base + "embed_norm")
    for i in range(cfg.num_layers):
        out.update(layer_from_tfm(p, f"{pre}encoder.layer.{i}.", f"{base}encoder/layers_{i}/", cfg.block.d_model))
    if arch in POOLED:
        if not cfg.pooler:
            raise HubError(f"{arch} has a pooler, this tfm BERT does not (pooler=False): export it as "
                           f"BertForMaskedLM or BertForQuestionAnswering, or build it with pooler=True")  # fmt: skip
        dense(pre + "pooler.dense", base + "pooler")
    need = {"BertForMaskedLM": "mlm_bias", "BertForSequenceClassification": "classifier/kernel",
            "BertForQuestionAnswering": "qa_outputs/kernel"}.get(arch)  # fmt: skip
    if need and need not in p:
        raise HubError(f"{arch}: this tfm model has no {need.split('/')[0]} head to export")
    if arch == "BertForMaskedLM":
        dense("cls.predictions.transform.dense", "mlm_transform")
        norm("cls.predictions.transform.LayerNorm", "mlm_norm")
        out["cls.predictions.bias"] = p["mlm_bias"]
    elif arch == "BertForSequenceClassification":
        dense("classifier", "classifier")
    elif arch == "BertForQuestionAnswering":
        dense("qa_outputs", "qa_outputs")
    return out


def to_hf(cfg: BertConfig, arch: str) -> dict:
    b = cfg.block
    hf = {
        "architectures": [arch], "model_type": "bert", "vocab_size": cfg.vocab_size, "hidden_size": b.d_model,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": b.num_heads, "intermediate_size": b.d_ff,
        "hidden_act": HF_ACTIVATIONS[b.activation], "hidden_dropout_prob": b.dropout_rate,
        "attention_probs_dropout_prob": b.attention_dropout_rate, "max_position_embeddings": cfg.max_len,
        "type_vocab_size": cfg.type_vocab_size, "initializer_range": cfg.init_std, "layer_norm_eps": b.norm_epsilon,
        "pad_token_id": None if cfg.pad_id < 0 else cfg.pad_id, "is_decoder": False, "add_cross_attention": False,
        "tie_word_embeddings": True, "classifier_dropout": None,
    }  # fmt: skip
    if arch == "BertForSequenceClassification":
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}
    return hf


def claims(module, cfg) -> str | None:
    """A tfm BERT whose layers are BERT's: post-LN LayerNorm, biases, a plain FFN, full softmax attention."""
    if not isinstance(cfg, BertConfig):
        return None
    b = cfg.block
    plain = (b.norm == "layernorm" and b.norm_position == "post" and b.attention_bias and b.mlp_bias
             and b.activation in HF_ACTIVATIONS and b.num_kv_heads in (None, b.num_heads)
             and b.head_dim in (None, b.d_model // b.num_heads) and b.attention == "full" and not b.num_experts
             and b.attention_scale is None and not b.use_rope)  # fmt: skip
    name = type(module).__name__
    if not plain or name not in MODULES or (name in POOLED and not cfg.pooler):
        return None
    return name


ARCHITECTURE = Architecture(tuple(MODULES), to_tfm, to_params, from_params, to_hf, claims)
