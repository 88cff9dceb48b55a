"""Fine-tune a pretrained GPT-2 on tiny Shakespeare with the checkpoint's own tokenizer.

The model is ``gpt2_small`` (the published GPT-2 small, 124,439,808 parameters); its
parameters come from the Hugging Face checkpoint that ``train.init_from`` names, and
the text is tokenized by that checkpoint's ``tokenizer.json`` (``data.tokenizer="hf"``).

    python -m tfm.train --config configs/finetune_gpt2_shakespeare.py --workdir /tmp/gpt2_shakespeare \\
        --config.train.init_from=hf:PATH/TO/gpt2 \\
        --config.data.data_dir=PATH/TO/DATA      # holds tinyshakespeare/input.txt

``hf:gpt2`` (a hub repo id) downloads the checkpoint where ``huggingface_hub`` and a network exist.
``:tiny`` is a 2-layer d 32 shape for tests, to pair with a tiny checkpoint of that shape.
"""

from tfm.config import default_config


def get_config(arg=None):
    c = default_config()
    c.model.preset = "gpt2_small"
    c.model.scan_layers = True
    c.data.name = "shakespeare_char"
    c.data.data_dir = ""  # "" -> $TFM_DATA_DIR, else ./data
    c.data.tokenizer = "hf"
    c.data.tokenizer_path = ""  # "": the tokenizer of the checkpoint in train.init_from
    c.data.block_size = 256
    c.data.batch_size = 8
    c.train.init_from = "hf:gpt2"

    # A gentle fine-tune: AdamW at 3e-5 after 50 warmup steps, cosine to 10 %, dropout as GPT-2 trained.
    c.optim.name = "adamw"
    c.optim.learning_rate = 3e-5
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 50
    c.optim.end_fraction = 0.1
    c.optim.weight_decay = 0.1
    c.optim.clip_norm = 1.0
    c.train.steps = 500
    c.train.log_every = 50
    c.train.eval_every = 250
    c.train.eval_steps = 10
    c.train.checkpoint_every = 250

    if arg == "tiny":
        c.model.max_len = 48
        c.model.d_model = 32
        c.model.num_heads = 4
        c.model.num_layers = 2
        c.model.d_ff = 128
        c.model.dropout_rate = 0.0
        c.model.attention_dropout_rate = 0.0
        c.data.block_size = 32
        c.data.batch_size = 4
        c.train.steps = 10
        c.train.log_every = 5
        c.train.eval_every = 10
        c.train.eval_steps = 2
        c.train.checkpoint_every = 10
    return c
