"""BERT masked-LM pretraining on tiny Shakespeare, by character (Devlin et al. 2019, §3.1).

A 4-layer, d 128 post-LN encoder (``bert_tiny_mlm`` widened); windows of 64 positions,
``[CLS]`` then 63 characters; 15 % of the characters chosen per window, of which 80 %
become ``[MASK]``, 10 % a random character and 10 % stay. The loss counts the chosen
positions only. The vocabulary is the 65 characters after 4 special ids: 69 (the model
takes its size from the data).

    python -m tfm.train --config configs/bert_mlm.py --workdir /tmp/bert_mlm \\
        --config.data.data_dir=PATH/TO/DATA      # holds tinyshakespeare/input.txt

``:tiny`` (2 layers, d 32, 60 steps) is the quick check the tests run. Fine-tune the
result with ``configs/bert_langid.py``.
"""

from tfm.config import default_config


def get_config(arg=None):
    c = default_config()
    c.model.preset = "bert_tiny_mlm"
    c.model.max_len = 64
    c.model.d_model = 128
    c.model.num_heads = 4
    c.model.num_layers = 4
    c.model.d_ff = 512
    # No dropout, as nanoGPT's CPU baseline on this corpus: 2,000 steps of 32 windows read ~4 M characters,
    # about four passes over the ~1 M characters of the training split.
    c.model.dropout_rate = 0.0
    c.model.attention_dropout_rate = 0.0

    c.data.name = "shakespeare_mlm"
    c.data.data_dir = ""  # "" -> $TFM_DATA_DIR, else ./data
    c.data.block_size = 64
    c.data.batch_size = 32

    # BERT: Adam(0.9, 0.999), weight decay 0.01, warmup then linear decay.
    c.optim.name = "adamw"
    c.optim.learning_rate = 1e-3
    c.optim.schedule = "linear"
    c.optim.warmup_steps = 200
    c.optim.b2 = 0.999
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 1.0
    c.train.steps = 2000
    c.train.log_every = 100
    c.train.eval_every = 500
    c.train.eval_steps = 20
    c.train.checkpoint_every = 500

    if arg == "tiny":
        c.model.d_model = 32
        c.model.num_layers = 2
        c.model.d_ff = 64
        c.data.block_size = 32
        c.model.max_len = 32
        c.data.batch_size = 16
        c.optim.learning_rate = 3e-3
        c.optim.warmup_steps = 5
        c.train.steps = 60
        c.train.log_every = 10
        c.train.eval_every = 0
        c.train.eval_steps = 4
        c.train.checkpoint_every = 60
    elif arg is not None:
        raise ValueError(f"configs/bert_mlm.py: unknown variant {arg!r}; use ':tiny' or nothing")
    return c
