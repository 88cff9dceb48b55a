"""Fine-tune a pretrained character BERT to tell English from German (Multi30k sentences).

Sequence classification on the ``[CLS]`` vector (``bert_tiny_classifier``), started
from a masked-LM run's parameters: ``train.init_from`` names its workdir, the encoder
and embeddings are taken from it (same shapes: the same vocabulary, read from that
run's ``vocab.json``), the classifier is new and the optimizer starts fresh.
German characters outside tiny Shakespeare's alphabet (ä, ö, ü, ß, ...) become ``[UNK]``.

    python -m tfm.train --config configs/bert_mlm.py --workdir /tmp/bert_mlm ...
    python -m tfm.train --config configs/bert_langid.py --workdir /tmp/bert_langid \\
        --config.train.init_from=/tmp/bert_mlm --config.data.tokenizer_path=/tmp/bert_mlm/vocab.json \\
        --config.data.data_dir=PATH/TO/DATA      # holds multi30k/

``:tiny`` matches ``configs/bert_mlm.py:tiny``.
"""

import os

from tfm.config import default_config, load_config


def get_config(arg=None):
    here = os.path.dirname(os.path.abspath(__file__))
    mlm = load_config(os.path.join(here, "bert_mlm.py") + (f":{arg}" if arg else ""))  # the shapes follow it
    c = default_config()
    c.model.preset = "bert_tiny_classifier"
    for key in ("max_len", "d_model", "num_heads", "num_layers", "d_ff", "dropout_rate",
                "attention_dropout_rate"):  # fmt: skip
        c.model[key] = mlm.model[key]
    # vocab_size comes from the data (the pretraining run's vocab.json), num_labels too (2 languages).

    c.data.name = "multi30k_langid"
    c.data.data_dir = ""
    c.data.max_len = mlm.data.block_size
    c.data.batch_size = 32
    c.data.tokenizer_path = ""  # the pretraining run's vocab.json

    c.optim.name = "adamw"
    c.optim.learning_rate = 1e-4 if arg is None else 1e-3
    c.optim.schedule = "linear"
    c.optim.warmup_steps = 50 if arg is None else 2
    c.optim.b2 = 0.999
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.01
    c.train.steps = 500 if arg is None else 20
    c.train.log_every = 50 if arg is None else 10
    c.train.eval_every = 0
    c.train.eval_steps = -1  # the whole validation split
    c.train.checkpoint_every = c.train.steps
    return c
