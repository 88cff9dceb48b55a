"""Multi30k English -> German with the encoder-decoder Transformer, sized for a 29k-pair corpus.

Shared sentencepiece BPE vocabulary (8,000) for both sides, tied embeddings, label
smoothing 0.1, the paper's Adam and Noam warmup, beam search 4 / alpha 0.6 at test time.

    python -m tfm.train --config configs/multi30k_en_de.py --workdir /tmp/m30k \\
        --config.data.data_dir=PATH/TO/DATA             # holds multi30k/{train,val,test_2016_flickr}.{en,de}
    python -m tfm.evaluate --workdir /tmp/m30k --split test --batches 0 --beam_size 4

Variants: ``:cpu`` (d 128, 3+3 layers, dropout 0.3, packed rows: a 2-core-CPU budget), ``:tiny`` (tests).
"""

from tfm.config import default_config


def get_config(arg=None):
    c = default_config()
    c.model.preset = "transformer_tiny"
    c.model.d_model = 256
    c.model.num_heads = 4
    c.model.d_ff = 1024
    c.model.num_encoder_layers = 3
    c.model.num_decoder_layers = 3
    c.model.dropout_rate = 0.1
    c.model.norm_position = "pre"

    c.data.name = "multi30k"
    c.data.data_dir = ""  # "" -> $TFM_DATA_DIR, else ./data
    c.data.tfds_dir = ""
    c.data.vocab_size = 8000
    c.data.max_len = 48
    c.data.bucket = True  # batches of similar lengths, padded to 16 / 32 / 48
    c.data.batch_size = 128

    c.optim.name = "adam"
    c.optim.schedule = "noam"
    c.optim.warmup_steps = 2000
    c.optim.noam_scale = 1.0
    c.optim.clip_norm = 0.0  # the paper does not clip
    c.train.label_smoothing = 0.1
    c.train.steps = 20000
    c.train.log_every = 100
    c.train.eval_every = 2000
    c.train.eval_steps = -1  # the whole validation split
    c.train.checkpoint_every = 2000
    c.train.best_metric = "eval/loss"

    if arg == "cpu":  # a 2-core CPU budget: about 11,000 of the 12,000 steps fit in 60 minutes (see README)
        c.model.d_model = 128
        c.model.num_heads = 4
        c.model.d_ff = 512
        c.model.num_encoder_layers = 3
        c.model.num_decoder_layers = 3
        c.model.dropout_rate = 0.3  # 29k pairs, ~75 epochs in the hour: 0.1 overfits (see README)
        c.data.vocab_size = 4000
        c.data.bucket = False
        c.data.pack = True
        c.data.batch_size = 64
        c.optim.warmup_steps = 400
        c.optim.noam_scale = 2.0
        c.train.steps = 12000
        c.train.eval_every = 1000
        c.train.checkpoint_every = 500
        c.train.keep_checkpoints = 5  # the last five, for `tfm.evaluate --average 5`
    elif arg == "tiny":
        c.model.d_model = 32
        c.model.d_ff = 64
        c.model.num_encoder_layers = 2
        c.model.num_decoder_layers = 2
        c.model.dropout_rate = 0.0
        c.data.vocab_size = 512
        c.data.max_len = 24
        c.data.batch_size = 32
        c.optim.name = "adamw"
        c.optim.schedule = "cosine"
        c.optim.learning_rate = 3e-3
        c.optim.warmup_steps = 10
        c.optim.clip_norm = 1.0
        c.train.steps = 60
        c.train.log_every = 20
        c.train.eval_every = 30
        c.train.eval_steps = 2
        c.train.checkpoint_every = 30
        c.train.best_metric = ""
    elif arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r}; use '', 'cpu' or 'tiny'")
    return c
