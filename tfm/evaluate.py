"""``python -m tfm.evaluate --workdir DIR [--split validation] [--batches 8] [--beam_size 0] [--average 1] [--out FILE]``.

Loads the newest checkpoint and reports teacher-forced loss / accuracy /
perplexity and, for sequence-to-sequence runs, the exact match of decoded
outputs (greedy, or beam search with ``--beam_size``). The JSON result goes to
``DIR/eval_<split>.json`` and, with ``--out``, to that file too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def write_json(path: str, record: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)  # never a half-written result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tfm.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--split", default="validation")
    p.add_argument("--batches", type=int, default=8, help="batches of the run's batch size")
    p.add_argument("--beam_size", type=int, default=0, help="0: greedy decoding")
    p.add_argument("--average", type=int, default=1, help="average the parameters of the newest N checkpoints")
    p.add_argument("--alpha", type=float, default=0.6, help="beam search length penalty")
    p.add_argument("--out", default="", help="also write the result here (e.g. results/<recipe>.json)")
    args = p.parse_args(argv)

    from tfm import inference

    try:
        run = inference.load(args.workdir, average=args.average)
        metrics = inference.evaluate_run(run, args.split, args.batches, args.beam_size, args.alpha)
    except (FileNotFoundError, ValueError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    record = inference.result_record(run, metrics, split=args.split, batches=args.batches)
    write_json(os.path.join(args.workdir, f"eval_{args.split}.json"), record)
    if args.out:
        write_json(args.out, record)
    print(json.dumps({"step": run.step, "split": args.split, **metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
