"""Validation loss of tfm and of a plain PyTorch GPT trained the same way on tiny Shakespeare.

    python benchmarks/quality_vs_pytorch.py --data_dir D [--lrs 1e-3,2e-3] [--seeds 0] [--steps 2000] \
        [--set model.scale_residual_init=true] [--same_init] [--out results/quality_vs_pytorch.json]

Both sides train the ``shakespeare_char`` recipe's model (4 layers, 4 heads, d 128,
block 64, batch 12) for ``--steps`` steps on the same batches with the same
schedule (linear warmup 100 steps, cosine to a tenth), AdamW (0.9, 0.99), weight
decay 0.1 on matrices and embeddings, clipping at 1.0. Each starts from its own
initialisation from the same distributions, each with its own generator: N(0, 0.02)
for every matrix and embedding, and the residual output projections at
0.02 / sqrt(2 * layers) when the tfm config scales them (``model.scale_residual_init``;
the recipe does not, nanoGPT does: ``--set model.scale_residual_init=true``
compares at nanoGPT's init). The validation loss is
nanoGPT's CPU-baseline protocol: the mean over 20 batches of the validation split
(the same 20 batches for both sides).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vs_pytorch import SHAPES, run_torch, torch_gpt, torch_optimizer  # noqa: E402

from tfm import config as config_lib  # noqa: E402
from tfm.trainer import Trainer  # noqa: E402

EVAL_BATCHES = 20


def recipe(data_dir: str, lr: float, steps: int, seed: int = 0, extra=()):
    c = config_lib.load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "shakespeare_char.py"))
    return config_lib.apply_overrides(c, [
        f"data.data_dir={data_dir}", f"optim.learning_rate={lr}", f"train.steps={steps}", f"seed={seed}",
        "mesh.data=1", "train.progress=none", "train.tensorboard=false", *extra,
    ])  # fmt: skip


def nanogpt_init(model, layers: int, torch, scale_residual: bool = True):
    """nanoGPT's ``_init_weights``: N(0, 0.02) for linears and embeddings, c_proj-style outputs scaled (if asked)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name:
                continue
            residual = scale_residual and name.endswith(("c_proj.weight", ".proj.weight"))
            std = 0.02 / math.sqrt(2 * layers) if residual else 0.02
            torch.nn.init.normal_(p, mean=0.0, std=std)


def torch_validation_loss(model, batches, torch):
    model.eval()
    total = 0.0
    with torch.no_grad():
        for b in batches:
            logits = model(torch.from_numpy(b["inputs"]).long())
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                             torch.from_numpy(b["targets"]).long().reshape(-1)))  # fmt: skip
    model.train()
    return total / len(batches)


def run(data_dir: str, lr: float, steps: int, torch, seed: int = 0, extra=(), same_init: bool = False) -> dict:
    config = recipe(data_dir, lr, steps, seed, extra)
    trainer = Trainer(config, devices=jax.devices()[:1])
    it = trainer.dataset.iterator("train")
    batches = [next(it) for _ in range(steps)]
    val_it = trainer.dataset.iterator("validation")
    val = [next(val_it) for _ in range(EVAL_BATCHES)]

    t0 = time.perf_counter()
    state = trainer.init_state()
    for b in batches:
        state, m = trainer.train_step(state, b)
    jax.block_until_ready(state)
    tfm_s = time.perf_counter() - t0
    tfm_val = trainer.evaluate(state.params, steps=EVAL_BATCHES)["eval/loss"]

    torch.manual_seed(seed)
    shape = SHAPES["shakespeare"]
    model = torch_gpt(shape, trainer.init_state().params, torch)  # tfm's initial weights, copied
    if not same_init:  # each side its own draw from the same distributions
        nanogpt_init(model, shape["num_layers"], torch, scale_residual=config.model.get("scale_residual_init", True))
    opt, lr_at = torch_optimizer(model, config, trainer.schedule, torch)
    t0 = time.perf_counter()
    run_torch(model, opt, lr_at, batches, config.optim.clip_norm, torch)
    torch_s = time.perf_counter() - t0
    return {
        "lr": lr, "seed": seed, "steps": steps, "eval_batches": EVAL_BATCHES, "same_init": same_init,
        "scale_residual_init": bool(config.model.get("scale_residual_init", True)),
        "tfm_validation_loss": tfm_val, "pytorch_validation_loss": torch_validation_loss(model, val, torch),
        "tfm_train_s": tfm_s, "pytorch_train_s": torch_s,
    }  # fmt: skip


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", required=True, help="holds tinyshakespeare/input.txt")
    p.add_argument("--lrs", default="1e-3,2e-3")
    p.add_argument("--seeds", default="0", help="comma-separated; each seed draws both sides' initial weights")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--set", action="append", default=[], help="a tfm config override, e.g. model.scale_residual_init=true")
    p.add_argument("--same_init", action="store_true",
                   help="PyTorch starts from a copy of tfm's initial weights: what is left between the two "
                        "validation losses is the implementations' float32 rounding over the run, not the draw")
    p.add_argument("--out", default="results/quality_vs_pytorch.json",
                   help="JSON of the results; entries of other (lr, seed, init) runs already there are kept")
    args = p.parse_args()
    import torch

    print("| peak lr | seed | steps | tfm validation loss | PyTorch validation loss | tfm train s | PyTorch train s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    results = []
    for lr in (float(v) for v in args.lrs.split(",")):
        for seed in (int(v) for v in args.seeds.split(",")):
            r = run(args.data_dir, lr, args.steps, torch, seed, args.set, args.same_init)
            results.append(r)
            print(f"| {lr:g} | {seed} | {r['steps']} | {r['tfm_validation_loss']:.4f} | "
                  f"{r['pytorch_validation_loss']:.4f} | {r['tfm_train_s']:.0f} | {r['pytorch_train_s']:.0f} |",
                  flush=True)  # fmt: skip
    if args.out:
        key = lambda r: (r["lr"], r["seed"], r["steps"], r["scale_residual_init"], r.get("same_init", False))  # noqa: E731
        kept = []
        if os.path.exists(args.out):
            with open(args.out, encoding="utf-8") as f:
                new = {key(r) for r in results}
                kept = [r for r in json.load(f).get("results", []) if key(r) not in new]
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"results": kept + results}, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
