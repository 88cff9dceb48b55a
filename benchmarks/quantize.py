"""What post-training int8 quantization costs and buys on a trained run: quality, bytes, speed.

    python benchmarks/quantize.py --workdir WORKDIR [--batches 20] [--rounds 5] [--bleu] [--out results/quantize_X.json]

For the run's float parameters and for each ``tfm.quantize`` mode (``int8``: weights;
``int8_dynamic``: weights and activations) it reports, in one process:

- the teacher-forced validation loss and accuracy over ``--batches`` batches (the same
  batches for every side), and with ``--bleu`` the sacreBLEU of the whole test split,
  decoded as ``tfm.evaluate --beam_size 4`` does;
- the parameter bytes (int8 values plus their float scales);
- the median time of the jitted evaluation step on one batch, the sides measured in
  turn (A B C A B C ...) for ``--rounds`` rounds, so the machine's noise hits all alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax

from tfm import inference, placement
from tfm import quantize as quantize_lib
from tfm.step import make_eval_step


def step_time(run: inference.Run, batch: dict, repeats: int = 20) -> float:
    """Median ms of one jitted evaluation step on ``batch`` (compiled first)."""
    step = jax.jit(make_eval_step(run.model, run.task))
    with placement.mesh_context(run.mesh, run.rules):
        jax.block_until_ready(step(run.params, batch))
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(step(run.params, batch))
            times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--bleu", action="store_true", help="also sacreBLEU on the test split (seq2seq runs)")
    p.add_argument("--out", default="")
    args = p.parse_args()

    base = inference.load(args.workdir)
    runs = {"float32": base, **{m: inference.quantize_run(base, m) for m in quantize_lib.MODES}}
    place = placement.BatchPlacer(base.mesh, base.rules, base.config.data.batch_size)
    batch = place(next(base.dataset.iterator("validation")))
    rows = {}
    for name, run in runs.items():
        metrics = run.evaluate(args.batches, "validation")
        rows[name] = {"loss": metrics["eval/loss"], "accuracy": metrics.get("eval/accuracy"),
                      "param_bytes": quantize_lib.param_bytes(run.params), "ms": []}  # fmt: skip
        if args.bleu:
            rows[name]["bleu"] = inference.bleu(run, "test", 0, 4, 0.6, 128, 32)["bleu"]
    for _ in range(args.rounds):
        for name, run in runs.items():
            rows[name]["ms"].append(step_time(run, batch))
    ref = rows["float32"]
    print(f"{args.workdir}: step {base.step}, {args.batches} validation batches of {base.config.data.batch_size}; "
          f"{platform.machine()}, {jax.devices()[0].device_kind}")  # fmt: skip
    print("| parameters | val loss | accuracy | " + ("BLEU | " if args.bleu else "") + "param MB | eval step ms | vs float |")
    print("|---|---|---|" + ("---|" if args.bleu else "") + "---|---|---|")
    for name, r in rows.items():
        r["ms_median"] = statistics.median(r["ms"])
        bleu = f"{r['bleu']:.2f} | " if args.bleu else ""
        print(f"| {name} | {r['loss']:.4f} | {r['accuracy']:.4f} | {bleu}{r['param_bytes'] / 1e6:.3f} | "
              f"{r['ms_median']:.2f} | {ref['ms_median'] / r['ms_median']:.2f}x |")  # fmt: skip
    if args.out:
        record = {"workdir_step": base.step, "batches": args.batches, "rounds": args.rounds,
                  "host": platform.machine(), "device": jax.devices()[0].device_kind, "results": rows}  # fmt: skip
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2, default=float)
            f.write("\n")


if __name__ == "__main__":
    main()
