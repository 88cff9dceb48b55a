"""``python -m tfm.evaluate --workdir DIR [--split validation] [--batches 8] [--beam_size 0] [--average 1] [--no_ema] [--tta flip] [--quantize int8|int8_dynamic] [--out FILE]``.

Loads the newest checkpoint and reports teacher-forced loss / accuracy /
perplexity and, for sequence-to-sequence runs, the exact match of decoded
outputs or, where the data has reference translations, sacreBLEU of the full
source sentences decoded as ``tfm.translate`` does (greedy, or beam search with
``--beam_size``). The result is printed as one JSON line on stdout, then
written to ``DIR/eval_<split>.json`` and, with ``--out``, to that file too.

Exit status: 0 done; 2 bad arguments or workdir (nothing computed, nothing
written); 1 the result was printed but a file could not be written.
"""

from __future__ import annotations

import json
import sys

from tfm import cli


def write_json(path: str, record: dict) -> None:
    """Write ``record`` whole or not at all (``OSError`` if it cannot be written)."""
    from tfm import storage

    path = storage.resolve(path, "--out")
    storage.makedirs(storage.parent(path))
    storage.write_atomic(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def _check_out(path: str) -> str:
    """Why ``--out`` cannot be written, checked before any work ('' if it can)."""
    from tfm import storage
    from tfm.workdir import unwritable

    if storage.isdir(storage.resolve(path, "--out")):
        return f"--out {path}: is a directory"
    why = unwritable(path)
    return f"--out {path}: {why}" if why else ""


def main(argv: list[str] | None = None) -> int:
    p = cli.Parser(prog="python -m tfm.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--split", default="validation")
    p.add_argument("--batches", type=cli.int_at_least(0, "0: the whole split"), default=8,
                   help="batches of the run's batch size; 0: the whole split")
    p.add_argument("--beam_size", type=cli.int_at_least(0, "0: greedy"), default=0, help="0: greedy decoding")
    p.add_argument("--average", type=cli.int_at_least(1), default=1,
                   help="average the parameters of the newest N checkpoints")
    p.add_argument("--no_ema", action="store_true",
                   help="the last parameters, not their moving average (a run with optim.ema_decay > 0)")
    p.add_argument("--tta", choices=("none", "flip"), default="none",
                   help="test-time augmentation of image classification: flip averages each image's class "
                        "probabilities with its left-right mirror's")
    p.add_argument("--alpha", type=cli.float_at_least(0.0), default=0.6, help="beam search length penalty")
    p.add_argument("--max_len", type=cli.int_at_least(1), default=128, help="decoded tokens at most (as tfm.translate)")
    p.add_argument("--batch_size", type=cli.int_at_least(1), default=32, help="sentences per decoding batch")
    p.add_argument("--quantize", choices=("int8", "int8_dynamic"), default=None,
                   help="int8 weights (int8), or int8 weights and activations (int8_dynamic), after loading")
    p.add_argument("--out", default="", help="also write the result here (e.g. results/<recipe>.json)")
    args = p.parse_args(argv)
    if args.out and (why := _check_out(args.out)):
        return cli.fail("evaluate", why)
    cli.quiet_libraries()

    from tfm import inference

    try:
        with cli.stdout_to_stderr():
            run = inference.load(args.workdir, average=args.average, ema=not args.no_ema)
            run = inference.quantize_run(run, args.quantize) if args.quantize else run
            if args.split not in run.dataset.SPLITS:
                raise ValueError(f"--split {args.split}: {args.workdir}'s data has splits {list(run.dataset.SPLITS)}")
            metrics = inference.evaluate_run(run, args.split, args.batches, args.beam_size, args.alpha,
                                             args.max_len, args.batch_size, flip=args.tta == "flip")  # fmt: skip
    except inference.USER_ERRORS as e:
        return cli.fail("evaluate", e)
    tta = {"test_time_augmentation": "mean of the image's and its mirror's probabilities"} if args.tta == "flip" else {}
    record = inference.result_record(run, metrics, split=args.split, batches=args.batches, **tta)
    print(json.dumps({"step": run.step, "split": args.split, **metrics, **tta}), flush=True)
    from tfm import storage

    status = 0
    for path in [storage.join(run.workdir, f"eval_{args.split}.json")] + ([args.out] if args.out else []):
        try:
            write_json(path, record)
        except OSError as e:
            status = cli.fail("evaluate", f"could not write {path} ({e.strerror or e}); the result is printed above", 1)
    return status


if __name__ == "__main__":
    sys.exit(main())
