"""The synthetic copy task (the Annotated Transformer's first example): an encoder-decoder
learns to copy random symbol sequences. Needs no data.

    python -m tfm.train --config configs/copy.py --workdir /tmp/copy
    python -m tfm.train --config configs/copy.py:tiny --workdir /tmp/copy_tiny
"""

from tfm.config import default_config


def get_config(arg=None):
    c = default_config()
    c.model.preset = "transformer_tiny"
    c.model.d_model = 64
    c.model.num_heads = 4
    c.model.d_ff = 128
    c.model.num_encoder_layers = 2
    c.model.num_decoder_layers = 2
    c.model.dropout_rate = 0.0
    c.model.norm_position = "pre"

    c.data.name = "copy"
    c.data.vocab_size = 16
    c.data.min_len = 4
    c.data.max_len = 12
    c.data.batch_size = 64

    c.optim.schedule = "cosine"
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 100
    c.train.steps = 1500
    c.train.log_every = 100
    c.train.eval_every = 500
    c.train.eval_steps = 4
    c.train.checkpoint_every = 500

    if arg == "tiny":  # reaches 100 % greedy exact match in ~10 s of training on a 2-core CPU
        c.model.d_model = 32
        c.model.d_ff = 64
        c.data.max_len = 6
        c.data.batch_size = 32
        c.optim.warmup_steps = 50
        c.train.steps = 800
        c.train.log_every = 100
        c.train.eval_every = 400
        c.train.eval_steps = 2
        c.train.checkpoint_every = 400
    elif arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r}; use '' or 'tiny'")
    return c
