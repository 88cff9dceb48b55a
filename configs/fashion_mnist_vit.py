"""A small hybrid Vision Transformer on Fashion-MNIST (28x28 grey, 10 classes).

A three-convolution stem (the ViT paper's hybrid, with the stem of Xiao et al. 2021)
turns the image into a 4x4 grid of 128-channel features; each cell is one token for a
6-layer, d 64 pre-LN Transformer with a class token. Patches of raw pixels
(``--config.model.stem_channels='()' --config.model.patch_size=4``) learn more slowly on
a CPU budget: 87.4 % test accuracy after 3,000 steps in 18.5 CPU minutes (see README).

    python -m tfm.train --config configs/fashion_mnist_vit.py --workdir /tmp/fmnist \\
        --config.data.data_dir=PATH/TO/DATA          # holds fashion_mnist/*-idx?-ubyte.gz
    python -m tfm.evaluate --workdir /tmp/fmnist --split test --batches 0 [--tta flip]

``--tta flip`` averages each test image's class probabilities with its mirror's: 92.44 % and
92.77 % against 92.11 % and 92.47 % from one view, for two runs of 15,600 steps in 19 min 21 s
and 19 min 20 s of training (see README).
"""

from tfm.config import default_config


def get_config(arg=None):
    c = default_config()
    c.model.preset = "vit_tiny"  # 28 px, 1 channel, 10 classes
    c.model.stem_channels = (32, 64, 128)  # 28 -> 14 -> 7 -> 4 px, 3x3 stride-2 convs
    c.model.patch_size = 1  # 4 x 4 = 16 tokens + the class token
    c.model.d_model = 64
    c.model.num_heads = 4
    c.model.num_layers = 6
    c.model.d_ff = 256
    c.model.dropout_rate = 0.0

    c.data.name = "fashion_mnist"
    c.data.data_dir = ""  # "" -> $TFM_DATA_DIR, else ./data
    c.data.tfds_dir = ""  # where the prepared array_record files go; "" -> tfds's default
    c.data.batch_size = 128
    c.data.crop_padding = 2  # random shifts of up to 2 px (and left-right flips, on by default)

    c.optim.name = "adamw"
    c.optim.learning_rate = 2e-3
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 200
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.05
    c.train.steps = 15600  # ~36 epochs, under 20 minutes on a 2-core CPU (see README)
    c.train.label_smoothing = 0.1
    c.train.log_every = 100
    c.train.eval_every = 2000
    c.train.eval_steps = -1  # the whole validation split
    c.train.checkpoint_every = 2000

    if arg == "tiny":
        c.data.crop_padding = 0
        c.model.stem_channels = ()
        c.model.patch_size = 7
        c.model.d_model = 32
        c.model.num_layers = 2
        c.model.d_ff = 64
        c.data.batch_size = 32
        c.optim.warmup_steps = 5
        c.train.steps = 100
        c.train.log_every = 20
        c.train.eval_every = 50
        c.train.eval_steps = 4
        c.train.checkpoint_every = 50
    elif arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r}; use '' or 'tiny'")
    return c
