"""DETR-style set prediction on synthetic shapes: coloured rectangles and ellipses on noise.

The data builder draws every image offline and deterministically (``tfm.data.shapes``: one to
four shapes, 6 classes = 2 shapes x 3 colours, 64 px). A small DETR (a 3-convolution stem to an
8 x 8 grid, a pre-LN encoder, 10 learned object queries through the decoder, class and box
heads) is trained with the Hungarian matching and DETR's set loss (cross-entropy with a 0.1
weight on "no object", 5 x L1 + 2 x GIoU on the matched boxes). AP@0.5 on held-out images::

    python -m tfm.train --config configs/detr_shapes.py --workdir /tmp/detr
    python -m tfm.evaluate --workdir /tmp/detr --split test --batches 0

Variants: ``""`` and ``tiny`` (for tests).
"""

from tfm.config import default_config


def get_config(arg=None):
    if arg not in (None, "", "tiny"):
        raise ValueError(f"unknown variant {arg!r}; use '' or 'tiny'")
    c = default_config()
    c.model.preset = "detr_small"  # 64 px, stem 32/64/128, 8 x 8 grid, d 128, 3 + 3 layers, 10 queries
    c.model.dropout_rate = 0.0

    c.data.name = "shapes_detection"
    c.data.image_size = 64
    c.data.min_objects = 1
    c.data.max_objects = 4
    c.data.eval_size = 500
    c.data.batch_size = 32

    c.optim.name = "adamw"
    c.optim.learning_rate = 5e-4
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 200
    c.optim.weight_decay = 1e-4
    c.optim.clip_norm = 1.0
    c.train.steps = 7000
    c.train.log_every = 100
    c.train.eval_every = 1000
    c.train.eval_steps = -1
    c.train.checkpoint_every = 1000

    if arg == "tiny":
        c.model.preset = "detr_tiny"  # 32 px, stem 8/16, d 32, 1 + 1 layers, 6 queries
        c.data.image_size = 32
        c.data.max_objects = 2
        c.data.eval_size = 16
        c.data.batch_size = 8
        c.optim.learning_rate = 3e-3
        c.optim.warmup_steps = 5
        c.train.steps = 40
        c.train.log_every = 10
        c.train.eval_every = 20
        c.train.checkpoint_every = 20
    return c
