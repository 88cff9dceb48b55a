"""Transformer-XL on tiny Shakespeare: what a memory of earlier segments buys at the same parameters.

The ``shakespeare_char`` shapes (4 layers, 4 heads, d_model 128, segments of 64 characters, batch 12,
2,000 steps), with the text read as 12 contiguous streams so each row continues the row before
it, and each layer attending over the previous 64 positions it saw (``mem_len``). ``:no_memory``
is the same model and data with ``mem_len=0``: the same parameters, each segment on its own.
Both are evaluated over the whole validation text, segment after segment (``train.eval_steps=-1``)::

    python -m tfm.train --config configs/shakespeare_xl.py --workdir /tmp/xl --config.data.data_dir=PATH/TO/DATA
    python -m tfm.train --config configs/shakespeare_xl.py:no_memory --workdir /tmp/xl0 --config.data.data_dir=PATH/TO/DATA

The Compressive Transformer at the same memory size (64 slots per layer): ``:compressive`` keeps
the last 32 states as they are and compresses the states they push out, 4 to 1, into 32 more
slots (so it reaches 32 + 4 x 32 = 160 positions back per layer); ``:half_memory`` is plain XL with
only those 32 recent states, what the compressed half adds to::

    python -m tfm.train --config configs/shakespeare_xl.py:compressive --workdir /tmp/cxl --config.data.data_dir=PATH/TO/DATA

Variants: ``""``, ``no_memory``, ``half_memory``, ``compressive``, and ``tiny``, ``tiny_no_memory``,
``tiny_compressive`` (for tests).
"""

from tfm.config import load_config

VARIANTS = ("", "no_memory", "half_memory", "compressive", "tiny", "tiny_no_memory", "tiny_compressive")


def get_config(arg=None):
    arg = arg or ""
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r}; use one of {VARIANTS}")
    tiny = arg.startswith("tiny")
    c = load_config("shakespeare_char:tiny" if tiny else "shakespeare_char")
    for field in ("max_len", "attention_bias", "mlp_bias", "scale_residual_init"):  # GPT's own fields
        del c.model[field]
    c.model.preset = "transformer_xl_tiny"
    c.model.mem_len = 0 if arg.endswith("no_memory") else c.data.block_size
    if arg.endswith(("compressive", "half_memory")):
        c.model.mem_len = c.data.block_size // 2
    if arg.endswith("compressive"):
        c.model.cmem_len, c.model.compression_rate = c.data.block_size // 2, 4
    c.data.contiguous = True
    c.train.eval_steps = -1  # the whole validation text, segment after segment
    if tiny:
        c.train.eval_steps = 4
    return c
