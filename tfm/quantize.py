"""Post-training int8 quantization of a trained model, with qwix (Google's JAX quantization library).

Two modes (``MODES``), for any family:

* ``int8``: weight-only. Every projection kernel (attention query/key/value/output,
  feed-forward and expert weights, an untied output head) is stored as int8 with one
  float32 scale per output channel (absmax over the contracted axes); the
  activations stay in floating point and the matmul runs on the dequantized kernel.
  Parameter bytes fall to about a quarter.
* ``int8_dynamic``: weights as above, and each activation entering those matmuls is
  quantized on the fly (absmax per token), so both operands are int8.

Left in floating point: token and position embeddings (and a head tied to them),
the attention core (``Q K^T`` and the weighted sum of ``V``, both operands
activations), norms, biases and convolution stems. ``quantize`` returns a model of
the same family and the quantized parameters; ``inference.quantize_run`` applies it
to a restored run for ``tfm.evaluate --quantize`` and the decoding CLIs.

qwix replaces the matmuls of the modules it intercepts with quantized ones and
finds each kernel by the parameter it comes from. The CPU fast paths of
``tfm.layers.tuning`` (projections folded into 2-D matmuls, one fused Q/K/V
matmul) reshape or concatenate the kernels first, so a quantized model runs with
them off.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from tfm.layers import tuning

MODES = ("int8", "int8_dynamic")
# The model methods that run matmuls (an encoder–decoder's decoding calls encode and decode).
METHODS = ("__call__", "encode", "decode")


def import_qwix():
    try:
        import qwix
    except ImportError:
        raise ValueError("quantization needs the qwix package: pip install 'tfm-jax[quantize]'") from None
    return qwix


def rules(mode: str) -> list:
    """qwix's rules for ``mode``, first match wins: what stays in floating point, then everything else."""
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r}: choose from {MODES}")
    qwix = import_qwix()
    keep = qwix.QuantizationRule  # a rule without a qtype leaves its matmuls as they are
    return [
        keep(module_path=r"(.*/)?\w*embed\w*(/.*)?"),  # embeddings, and heads tied to them
        keep(module_path=r"(.*/)?(self|cross)_attention"),  # the attention core (the projections are below it)
        keep(module_path=".*", op_names=("conv_general_dilated",)),  # convolution stems
        qwix.QuantizationRule(module_path=".*", weight_qtype=jnp.int8,
                              act_qtype=jnp.int8 if mode == "int8_dynamic" else None),  # fmt: skip
    ]


@contextlib.contextmanager
def plain_matmuls() -> Iterator[None]:
    """Projections and convolutions as written (no 2-D folding, fused Q/K/V, patch matmuls) while quantized."""
    old = tuning.FOLD_TO_MATMUL, tuning.FUSED_QKV, tuning.CONV_AS_MATMUL
    tuning.FOLD_TO_MATMUL, tuning.FUSED_QKV, tuning.CONV_AS_MATMUL = False, False, False
    try:
        yield
    finally:
        tuning.FOLD_TO_MATMUL, tuning.FUSED_QKV, tuning.CONV_AS_MATMUL = old


def _with_plain_matmuls(cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of the family whose methods trace under ``plain_matmuls`` (its decode twin inherits it)."""

    def wrap(method):
        def call(self, *args, **kwargs):
            with plain_matmuls():
                return method(self, *args, **kwargs)

        call.__name__, call.__doc__ = method.__name__, method.__doc__  # not functools.wraps: qwix unwraps that
        return call

    methods = {name: wrap(getattr(cls, name)) for name in METHODS if hasattr(cls, name)}
    return type(cls.__name__, (cls,), methods)


def quantize(model: nn.Module, params: Any, mode: str, *example_args: Any, **example_kwargs: Any) -> tuple[nn.Module, Any]:
    """``(quantized model, quantized params)`` of a trained ``model`` and its float ``params``.

    ``example_args`` / ``example_kwargs``: inputs of the model's ``__call__`` (their
    shapes only are used, to find which kernels each matmul reads).
    """
    qwix = import_qwix()
    from tfm.hub.convert import unflatten, unscan

    # Its floating-point parts compute in the parameters' dtype (a quantized kernel is dequantized to it), and
    # its layers are unrolled: qwix quantizes one layer's kernel at a time, not a scanned stack of them.
    params = nn.unbox(params)
    changes = {"dtype": model.config.block.param_dtype}
    if "scan_layers" in model.config.own_fields() and model.config.scan_layers:
        changes["scan_layers"] = False
        params = jax.tree.map(jnp.asarray, unflatten(unscan(params)))
    config = model.config.replace(**changes)
    plain = _with_plain_matmuls(type(model))(config)
    qmodel = qwix.quantize_model(plain, qwix.PtqProvider(rules(mode)),
                                 methods=tuple(m for m in METHODS if hasattr(plain, m)))  # fmt: skip
    abstract = jax.eval_shape(lambda: qmodel.init(jax.random.key(0), *example_args, **example_kwargs))["params"]
    qparams = qwix.quantize_params(params, abstract)
    return qmodel, qparams


def param_bytes(params: Any) -> int:
    """Bytes of every array in ``params`` (int8 values and their scales count as stored)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nn.unbox(params)))


__all__ = ["MODES", "param_bytes", "plain_matmuls", "quantize", "rules"]
