"""Multimodal fusion: does the caption describe the image? Fashion-MNIST images and captions.

Half the rows pair an image with a caption of its own class ("a photo of a sneaker"), the
others with a caption of another class in the same template (``tfm.data.captions``). A ViT
encoder for the image (4 x 4 patches of 7 px), a text encoder for the caption, then fusion
layers over both token sets with modality embeddings (``tfm.models.fusion``) answer match /
no match from the fused first token. Neither modality alone can do better than chance::

    python -m tfm.train --config configs/fusion_fashion_mnist.py --workdir /tmp/fusion --config.data.data_dir=D
    python -m tfm.evaluate --workdir /tmp/fusion --split test --batches 0

Variants: ``""`` and ``tiny`` (for tests).
"""

from tfm.config import default_config


def get_config(arg=None):
    if arg not in (None, "", "tiny"):
        raise ValueError(f"unknown variant {arg!r}; use '' or 'tiny'")
    c = default_config()
    c.model.preset = "fusion_tiny"
    c.model.vocab_size = 64  # the captions use 31 words + pad + EOT
    c.model.d_model = 96
    c.model.num_heads = 4
    c.model.d_ff = 384
    c.model.image_layers = 4
    c.model.text_layers = 1
    c.model.fusion_layers = 2
    c.model.dropout_rate = 0.1

    c.data.name = "fashion_mnist_matching"
    c.data.data_dir = ""  # "" -> $TFM_DATA_DIR, else ./data
    c.data.tfds_dir = ""
    c.data.batch_size = 128
    c.data.crop_padding = 2

    c.optim.name = "adamw"
    c.optim.learning_rate = 1e-3
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 200
    c.optim.weight_decay = 0.05
    c.optim.clip_norm = 1.0
    c.train.steps = 3000
    c.train.log_every = 100
    c.train.eval_every = 1000
    c.train.eval_steps = -1
    c.train.checkpoint_every = 1000

    if arg == "tiny":
        c.data.crop_padding = 0
        c.model.d_model, c.model.d_ff, c.model.image_layers, c.model.fusion_layers = 32, 64, 1, 1
        c.model.dropout_rate = 0.0
        c.data.batch_size = 32
        c.optim.learning_rate = 3e-3
        c.optim.warmup_steps = 5
        c.train.steps = 200  # enough to beat chance (0.5) on held-out pairs
        c.train.log_every = 20
        c.train.eval_every = 100
        c.train.eval_steps = 4
        c.train.checkpoint_every = 100
    return c
