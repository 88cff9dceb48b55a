"""A recipe's training step with one of tfm's CPU kernels on and off, side by side.

    python benchmarks/cpu_attention_step.py --config configs/fashion_mnist_vit.py [--kernel attention|adamw|rowwise]
        [--steps 100] [--rounds 3] [--config.KEY=VALUE ...]

Builds the recipe's ``Trainer`` (one device, as ``python -m tfm.train`` on a CPU),
compiles its step twice (a trainer each), with the kernel on and off: ``--kernel
attention`` sets ``tuning.CPU_ATTENTION`` (``tfm.layers.cpu_attention`` against XLA's
attention path), ``--kernel adamw`` sets ``tuning.FUSED_OPTIMIZER`` (``tfm.fused_optim``
against optax's update and the guard's select), ``--kernel rowwise`` sets
``tuning.CPU_ROWWISE`` (``tfm.layers.cpu_rowwise``'s norms and GELU against the XLA paths with
the hand-written backward). The two run alternately on the same 20
batches, placed on the device beforehand: ``--rounds`` rounds of ``--steps`` steps each
after 3 warm-up steps. Prints each round's ms per step and the ratio of the medians
(XLA path / kernel: above 1 means the kernel's step is faster), and the losses of the
two sides' first steps (the same computation).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tfm import host_memory  # noqa: E402

host_memory.dispatch_inline()  # as python -m tfm.train does, before JAX starts

import jax  # noqa: E402

from tfm import config as config_lib  # noqa: E402
from tfm.layers import cpu_kernels, tuning  # noqa: E402
from tfm.trainer import Trainer  # noqa: E402

# --kernel: the tuning setting it turns on and off, and the FFI target its step then holds.
KERNELS = {"attention": ("CPU_ATTENTION", "tfm_attention_cpu_forward"), "adamw": ("FUSED_OPTIMIZER", "tfm_adamw_cpu"),
           "rowwise": ("CPU_ROWWISE", "tfm_norm_cpu_forward")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a recipe, e.g. configs/shakespeare_char.py or FILE:variant")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--kernel", choices=sorted(KERNELS), default="attention")
    args, overrides = p.parse_known_args()
    if not cpu_kernels.available():
        raise SystemExit("cpu_attention_step: tfm's CPU kernels could not be built (no C++ compiler?)")
    setting, target = KERNELS[args.kernel]
    overrides = [o.removeprefix("--config.") for o in overrides] + ["train.progress=none", "train.tensorboard=false"]
    cfg = config_lib.apply_overrides(config_lib.load_config(args.config), overrides)
    sides, first_loss, batches = {}, {}, None
    for name, on in (("kernel", True), ("xla_path", False)):
        # A trainer each: a trainer keeps its compiled step; the fused update is picked when the trainer is
        # made, the attention path when the step is traced.
        setattr(tuning, setting, on)
        trainer = Trainer(cfg, devices=jax.devices()[:1])
        if batches is None:
            it = trainer.dataset.iterator("train")
            batches = [host_memory.settle(trainer.place(next(it))) for _ in range(20)]
        state = trainer.init_state()
        step = trainer.compile_step(state, batches[0])
        if (target in step.as_text()) != on:
            raise SystemExit(f"cpu_attention_step: the {name} side's step {'lacks' if on else 'has'} the kernel")
        state, metrics = step(state, batches[0])
        first_loss[name] = float(metrics["loss"])
        sides[name] = [step, state]
    setattr(tuning, setting, None)
    times = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, side in sides.items():
            step, state = side
            for b in batches[1:4]:
                state, metrics = step(state, b)
            jax.block_until_ready(metrics)
            t0 = time.perf_counter()
            for i in range(args.steps):
                state, metrics = step(state, batches[i % len(batches)])
            jax.block_until_ready(metrics)
            times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
            side[1] = state
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"{args.config} --kernel {args.kernel}: ms/step, kernel {[round(t, 1) for t in times['kernel']]}, "
          f"XLA path {[round(t, 1) for t in times['xla_path']]}; XLA path / kernel "
          f"{med['xla_path'] / med['kernel']:.3f}; step-1 loss {first_loss['kernel']:.6f} / "
          f"{first_loss['xla_path']:.6f}")  # fmt: skip


if __name__ == "__main__":
    main()
