"""``python -m tfm.translate --workdir DIR [--beam_size 4] [--alpha 0.6] [--max_len 128] < input.txt > output.txt``.

One source sentence per input line, one output line each, in order, with a
trained encoder-decoder run. Beam search by default (the paper's beam 4,
alpha 0.6); ``--beam_size 0`` decodes greedily.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tfm.translate", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--beam_size", type=int, default=4)
    p.add_argument("--average", type=int, default=1, help="average the parameters of the newest N checkpoints")
    p.add_argument("--alpha", type=float, default=0.6)
    p.add_argument("--max_len", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=32)
    args = p.parse_args(argv)

    import numpy as np

    from tfm import inference

    try:
        run = inference.load(args.workdir, average=args.average)
        if run.trainer.task != "seq2seq":
            raise ValueError(f"{args.workdir} holds a {run.trainer.task} model; translate needs an encoder-decoder")
        lines = [line.rstrip("\n") for line in sys.stdin]
        encoded = [run.dataset.encode(line) for line in lines]
    except (FileNotFoundError, ValueError) as e:
        print(f"translate: {e}", file=sys.stderr)
        return 2
    ds = run.dataset
    for start in range(0, len(encoded), args.batch_size):
        chunk = encoded[start : start + args.batch_size]
        n = len(chunk)
        # Pad rows and the batch to fixed shapes so one compiled program serves every chunk.
        width = max(max((len(x) for x in chunk), default=1), 1)
        width = -(-width // 16) * 16
        src = np.full((args.batch_size, width), ds.pad_id, np.int32)
        for i, x in enumerate(chunk):
            src[i, : len(x)] = x
        out = inference.translate_ids(run, src, args.beam_size, args.alpha, args.max_len)
        for row in out[:n]:
            print(ds.decode(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
