"""CLIP on Fashion-MNIST: images paired with captions made from class names and templates.

Each training image comes with one of ten templates filled with its class name ("a close up
photo of a sneaker"); a ViT image tower (7x7 patches: 16 tokens + the class token) and a causal
text tower learn to agree under the symmetric contrastive loss. Zero-shot test accuracy names
each image by the nearest class prompt built from five templates training never saw
(``tfm.zero_shot``)::

    python -m tfm.train --config configs/clip_fashion_mnist.py --workdir /tmp/clip \\
        --config.data.data_dir=PATH/TO/DATA          # holds fashion_mnist/*-idx?-ubyte.gz
    python -m tfm.evaluate --workdir /tmp/clip --split test --batches 0

Variants: ``""`` and ``tiny`` (for tests).
"""

from tfm.config import default_config


def get_config(arg=None):
    if arg not in (None, "", "tiny"):
        raise ValueError(f"unknown variant {arg!r}; use '' or 'tiny'")
    c = default_config()
    c.model.preset = "clip_tiny"  # 28 px grey images, word-level captions of at most 16 tokens, EOT id 1
    c.model.vocab_size = 64  # the captions use 31 words + pad + EOT
    c.model.patch_size = 7  # 4 x 4 = 16 tokens + the class token
    c.model.vision_d_model = 96
    c.model.vision_num_heads = 4
    c.model.vision_d_ff = 384
    c.model.vision_layers = 4
    c.model.d_model = 64
    c.model.num_heads = 4
    c.model.d_ff = 256
    c.model.text_layers = 2
    c.model.embed_dim = 64

    c.data.name = "fashion_mnist_captions"
    c.data.data_dir = ""  # "" -> $TFM_DATA_DIR, else ./data
    c.data.tfds_dir = ""
    c.data.batch_size = 256  # the negatives of each example: the rest of its batch
    c.data.crop_padding = 2

    c.optim.name = "adamw"
    c.optim.learning_rate = 2e-3
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 200
    c.optim.b2 = 0.98  # CLIP's
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.1
    c.train.steps = 2500
    c.train.log_every = 100
    c.train.eval_every = 1250
    c.train.eval_steps = -1
    c.train.checkpoint_every = 1250

    if arg == "tiny":
        c.data.crop_padding = 0
        c.model.patch_size = 7
        c.model.vision_d_model, c.model.vision_d_ff, c.model.vision_layers = 32, 64, 2
        c.model.d_model, c.model.d_ff, c.model.embed_dim = 32, 64, 32
        c.data.batch_size = 32
        c.optim.warmup_steps = 5
        c.train.steps = 60
        c.train.log_every = 20
        c.train.eval_every = 30
        c.train.eval_steps = 4
        c.train.checkpoint_every = 30
    return c
