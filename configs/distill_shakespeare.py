"""Knowledge distillation on tiny Shakespeare: a 6-layer d 256 character model teaches a 2-layer d 128 one.

Three runs on the same data, tokens and steps as ``shakespeare_char`` (nanoGPT's CPU baseline);
the student's validation loss with the teacher is compared with the same student trained alone::

    python -m tfm.train --config configs/distill_shakespeare.py:teacher --workdir /tmp/teacher \\
        --config.data.data_dir=PATH/TO/DATA
    python -m tfm.train --config configs/distill_shakespeare.py --workdir /tmp/student \\
        --config.data.data_dir=PATH/TO/DATA --config.distill.teacher=/tmp/teacher
    python -m tfm.train --config configs/distill_shakespeare.py:alone --workdir /tmp/alone \\
        --config.data.data_dir=PATH/TO/DATA

Variants: ``""`` (the student; name its teacher with ``distill.teacher``), ``teacher``, ``alone``
(the student without a teacher), and ``tiny``, ``tiny_teacher``, ``tiny_alone`` for tests.
"""

from tfm.config import load_config

VARIANTS = ("", "teacher", "alone", "tiny", "tiny_teacher", "tiny_alone")


def get_config(arg=None):
    arg = arg or ""
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r}; use one of {VARIANTS}")
    tiny = arg.startswith("tiny")
    c = load_config("shakespeare_char:tiny" if tiny else "shakespeare_char")
    role = arg.removeprefix("tiny").strip("_") or "student"
    if role == "teacher":
        c.model.update(dict(num_layers=2, d_model=64, num_heads=4, d_ff=128) if tiny else
                       dict(num_layers=6, d_model=256, num_heads=8, d_ff=1024))  # fmt: skip
        if not tiny:
            c.optim.learning_rate = 2e-3
    else:
        if not tiny:
            c.model.update(dict(num_layers=2, d_model=128, num_heads=4, d_ff=512))
        if role == "student":
            # Hinton et al.'s mix: half the soft loss at T = 2 (scaled by T^2), half the hard labels.
            c.distill.alpha = 0.5
            c.distill.temperature = 2.0
    return c
