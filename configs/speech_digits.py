"""Whisper-style speech recognition of synthetic spoken digit strings ("three one four").

The data builder synthesises every clip offline and deterministically with a formant speech
model and random speakers, rates, pitch and noise (``tfm.data.speech``); a small Whisper
(the conv stem, a pre-LN encoder over 50 frames a second, a decoder with cross-attention)
writes the words character by character. The character error rate is measured on held-out
clips by decoding with the KV cache::

    python -m tfm.train --config configs/speech_digits.py --workdir /tmp/speech
    python -m tfm.evaluate --workdir /tmp/speech --split test --batches 0

Variants: ``""`` and ``tiny`` (for tests).
"""

from tfm.config import default_config


def get_config(arg=None):
    if arg not in (None, "", "tiny"):
        raise ValueError(f"unknown variant {arg!r}; use '' or 'tiny'")
    c = default_config()
    c.model.preset = "whisper_micro"  # character vocabulary: pad 0, start 1, end 2
    c.model.d_model = 128
    c.model.num_heads = 4
    c.model.d_ff = 512
    c.model.num_encoder_layers = 3
    c.model.num_decoder_layers = 2
    c.model.dropout_rate = 0.1

    c.data.name = "speech_digits"
    c.data.train_size = 6000
    c.data.eval_size = 500
    c.data.max_digits = 4
    c.data.clip_seconds = 2.56  # 256 frames -> 128 encoder positions
    c.data.batch_size = 32

    c.optim.name = "adamw"
    c.optim.learning_rate = 1e-3
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 200
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 1.0
    c.train.steps = 3000
    c.train.log_every = 100
    c.train.eval_every = 1000
    c.train.eval_steps = -1
    c.train.checkpoint_every = 1000

    if arg == "tiny":
        c.model.d_model, c.model.d_ff = 32, 64
        c.model.num_encoder_layers = c.model.num_decoder_layers = 1
        c.model.dropout_rate = 0.0
        c.data.train_size, c.data.eval_size, c.data.max_digits = 64, 16, 2
        c.data.clip_seconds = 1.6
        c.data.batch_size = 8
        c.optim.learning_rate = 3e-3
        c.optim.warmup_steps = 5
        c.train.steps = 40
        c.train.log_every = 10
        c.train.eval_every = 20
        c.train.eval_steps = 2
        c.train.checkpoint_every = 20
    return c
