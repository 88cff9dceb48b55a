"""Choices that make the training step faster on one backend and change no result.

Each is picked by ``jax.default_backend()`` when left at ``None``, and can be
forced (``tuning.FUSED_QKV = False``) to compare both sides or to test that
they agree. Measured on the CPU backend with ``benchmarks/vs_pytorch.py``:

* ``FOLD_TO_MATMUL``: projections run as one 2-D matmul (``[B*T, D] @ [D, F]``)
  instead of the einsum over ``[B, T, D]``. On CPU the weight gradient of the
  3-D einsum makes XLA materialise transposed copies of the activations (a third
  of a small GPT's step); the 2-D form does not. GPU and TPU compile both forms
  to the same kernels.
* ``FUSED_QKV``: self-attention computes query, key and value with one matmul
  over the three kernels concatenated (the parameters stay separate). One wide
  matmul instead of three narrow ones, and one input gradient instead of a sum
  of three.
* ``UNROLL_LAYERS``: a scanned stack of at most this many layers is unrolled
  (``nn.scan(unroll=L)``): the same stacked parameters, but no loop. On CPU the
  loop's stacked residuals (written with dynamic-update-slice, read back with
  dynamic-slice) cost a fifth of a small model's step. Deeper stacks stay
  rolled, so compile time stays flat in depth.
* ``CAUSAL_BLOCK_ROWS``: causal self-attention over T positions runs by query
  blocks of at least this many rows, each against the keys up to its last row
  (``dot_product._causal_blocked_attention``): the blocks above the diagonal,
  all masked, are never computed. At most 8 blocks, so compile time stays flat
  in T. 0 turns it off (GPU and TPU: their fused kernels skip those blocks).
* ``CONV_AS_MATMUL``: the convolution stems run as one matmul over patches
  (``tfm.layers.conv``). On CPU XLA computes a strided convolution's weight
  gradient as a window-dilated convolution, slower than the matmul; GPU and TPU
  have convolution kernels of their own.
* ``HAND_VJP``: LayerNorm and RMSNorm differentiate through a hand-written
  backward (``tfm.layers.norms.layer_norm``: two row reductions and one pass)
  instead of XLA's derivative of the mean and variance, and the exact GELU
  through its derivative written out (``tfm.layers.feedforward.gelu``). On CPU
  the norms made the GPT step 3–6 % faster and the GELU ~1 % more (both shapes
  of ``benchmarks/vs_pytorch.py``); both together, the Fashion-MNIST ViT step
  10.6 % and the Multi30k ``:cpu`` step 5.9 %. GPU and TPU keep XLA's
  derivatives, unmeasured there.
* ``CPU_ATTENTION``: the dense attention runs as one fused native kernel
  (``tfm.layers.cpu_attention``: scores, softmax and output by blocks of query
  rows, no ``[B, N, T, S]`` tensors, the backward recomputing the
  probabilities), when the kernel builds and the inputs are float32 without a
  bias, dropout or returned weights. Default: the CPU backend with one device
  (a sharded batch keeps the XLA path, which the partitioner splits). With
  ``FUSED_QKV`` and no RoPE or cache in between, self-attention hands the kernel
  the fused projection's output unsplit and takes one gradient tensor back.
* ``CPU_ROWWISE``: LayerNorm, RMSNorm and the exact GELU run as native kernels
  (``tfm.layers.cpu_rowwise``: each norm one pass over the rows forward and one
  backward, instead of XLA's chain of reductions and loops; the GELU with a
  vectorised erf), when the kernels build and the inputs are float32. A pre-LN
  block's norm also adds the residual sum's gradient to its input gradient in its
  backward pass (``keep_input``), where XLA ran that add as a pass of its own. It
  takes precedence over ``HAND_VJP``, whose formulas the kernels compute. Default:
  the CPU backend with one device (a sharded batch keeps the XLA path).
* ``FUSED_OPTIMIZER``: the Adam/AdamW update, its global-norm clipping and the
  train step's non-finite guard run as one native pass over the parameters
  (``tfm.fused_optim``) instead of XLA's passes and the guard's select over the
  whole state. Default: the CPU backend with one device (the Trainer also asks
  for a one-device mesh), float32 parameters.
"""

from __future__ import annotations

import jax

FOLD_TO_MATMUL: bool | None = None
FUSED_QKV: bool | None = None
UNROLL_LAYERS: int | None = None
CAUSAL_BLOCK_ROWS: int | None = None
CONV_AS_MATMUL: bool | None = None
CPU_ATTENTION: bool | None = None
FUSED_OPTIMIZER: bool | None = None
CPU_ROWWISE: bool | None = None
HAND_VJP: bool | None = None

_CPU_UNROLL_LAYERS = 8
_CPU_CAUSAL_BLOCK_ROWS = 64
_MAX_CAUSAL_BLOCKS = 8


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def fold_to_matmul() -> bool:
    return _on_cpu() if FOLD_TO_MATMUL is None else FOLD_TO_MATMUL


def fused_qkv() -> bool:
    return _on_cpu() if FUSED_QKV is None else FUSED_QKV


def conv_as_matmul() -> bool:
    return _on_cpu() if CONV_AS_MATMUL is None else CONV_AS_MATMUL


def hand_vjp() -> bool:
    return _on_cpu() if HAND_VJP is None else HAND_VJP


def cpu_attention() -> bool:
    return (_on_cpu() and jax.device_count() == 1) if CPU_ATTENTION is None else CPU_ATTENTION


def cpu_rowwise() -> bool:
    return (_on_cpu() and jax.device_count() == 1) if CPU_ROWWISE is None else CPU_ROWWISE


def fused_optimizer() -> bool:
    return (_on_cpu() and jax.device_count() == 1) if FUSED_OPTIMIZER is None else FUSED_OPTIMIZER


def scan_unroll(length: int) -> int:
    """The ``unroll`` of a layer scan of ``length`` steps: all of them for a shallow stack on CPU, else 1."""
    limit = (_CPU_UNROLL_LAYERS if _on_cpu() else 0) if UNROLL_LAYERS is None else UNROLL_LAYERS
    return length if length <= limit else 1


def causal_blocks(length: int) -> int:
    """How many query blocks causal self-attention over ``length`` positions runs in (1: not blocked)."""
    rows = (_CPU_CAUSAL_BLOCK_ROWS if _on_cpu() else 0) if CAUSAL_BLOCK_ROWS is None else CAUSAL_BLOCK_ROWS
    if rows <= 0:
        return 1
    blocks = min(length // rows, _MAX_CAUSAL_BLOCKS)
    while blocks > 1 and length % blocks:
        blocks -= 1
    return max(blocks, 1)
