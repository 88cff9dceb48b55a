"""Character-level GPT on tiny Shakespeare: nanoGPT's CPU baseline shape.

4 layers, 4 heads, d_model 128, block 64, batch 12, 2000 steps, vocabulary 65
(``python train.py config/train_shakespeare_char.py --device=cpu --block_size=64
--batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
--lr_decay_iters=2000 --dropout=0.0`` in nanoGPT's README).

    python -m tfm.train --config configs/shakespeare_char.py --workdir /tmp/shakespeare \\
        --config.data.data_dir=PATH/TO/DATA      # holds tinyshakespeare/input.txt
"""

from tfm.config import default_config


def get_config(arg=None):
    c = default_config()
    c.model.preset = "gpt_tiny"
    c.model.max_len = 64
    c.model.d_model = 128
    c.model.num_heads = 4
    c.model.num_layers = 4
    c.model.d_ff = 512
    c.model.activation = "gelu"
    c.model.attention_bias = False
    c.model.mlp_bias = False
    c.model.dropout_rate = 0.0
    c.model.attention_dropout_rate = 0.0
    # Every matrix at N(0, 0.02), as nanoGPT's PyTorch CPU baseline; GPT-2's 1/sqrt(2 * layers) on the
    # residual output projections was worse at 4 layers (validation 1.8080 vs 1.7993 at peak lr 2e-3).
    c.model.scale_residual_init = False

    c.data.name = "shakespeare_char"
    c.data.data_dir = ""  # "" -> $TFM_DATA_DIR, else ./data
    c.data.block_size = 64
    c.data.batch_size = 12

    # nanoGPT: AdamW(0.9, 0.99), lr 1e-3 -> 1e-4 cosine after 100 warmup steps, wd 0.1, clip 1.0.
    # A peak of 3e-3 (to 3e-4) reaches validation loss 1.758 in the same 2000 steps (2e-3: 1.799; 1e-3: 1.897).
    c.optim.name = "adamw"
    c.optim.learning_rate = 3e-3
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 100
    c.optim.end_fraction = 0.1
    c.optim.b2 = 0.99
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
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
        c.model.max_len = 32
        c.data.block_size = 32
        c.data.batch_size = 8
        c.optim.warmup_steps = 5
        c.train.steps = 30
        c.train.log_every = 10
        c.train.eval_every = 15
        c.train.eval_steps = 2
        c.train.checkpoint_every = 15
    elif arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r}; use '' or 'tiny'")
    return c
