"""``python -m tfm.translate (--workdir DIR | --hf CHECKPOINT) [--beam_size 4] [--alpha 0.6] [--max_len 128] [--quantize int8|int8_dynamic] < input.txt > output.txt``.

One source sentence per input line, one output line each, in order, with a
trained encoder-decoder run, or a Hugging Face checkpoint (``--hf``: Marian, T5) with
its own tokenizer: a blank line gives an empty line. Beam search by
default (the paper's beam 4, alpha 0.6); ``--beam_size 0`` decodes greedily.
Input that is not UTF-8, or holds symbols the vocabulary lacks, is reported by
line number on stderr and gives an empty output line; the other lines are
translated, and the exit status is 2.
Exit status: 0 done, 2 bad arguments, workdir or input.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tfm import cli


def read_lines(stream: Iterable[bytes]) -> tuple[list[str], list[int]]:
    """The lines of a binary stream as text, and the (1-based) numbers of those that are not UTF-8 ('' there)."""
    lines, bad = [], []
    for number, raw in enumerate(stream, start=1):
        try:
            lines.append(raw.decode("utf-8").rstrip("\r\n"))
        except UnicodeDecodeError:
            lines.append("")
            bad.append(number)
    return lines, bad


def main(argv: list[str] | None = None) -> int:
    p = cli.Parser(prog="python -m tfm.translate", description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a tfm training run")
    source.add_argument("--hf", help="a Hugging Face checkpoint directory (or hub repo id)")
    p.add_argument("--beam_size", type=cli.int_at_least(0, "0: greedy"), default=4)
    p.add_argument("--average", type=cli.int_at_least(1), default=1,
                   help="average the parameters of the newest N checkpoints")
    p.add_argument("--alpha", type=cli.float_at_least(0.0), default=0.6)
    p.add_argument("--max_len", type=cli.int_at_least(1), default=128, help="output tokens at most")
    p.add_argument("--batch_size", type=cli.int_at_least(1), default=32)
    p.add_argument("--quantize", choices=("int8", "int8_dynamic"), default=None,
                   help="int8 weights (int8), or int8 weights and activations (int8_dynamic), after loading")
    args = p.parse_args(argv)
    cli.quiet_libraries()

    from tfm import inference

    try:
        with cli.stdout_to_stderr():
            if args.hf:
                if args.average != 1:
                    raise ValueError("--average averages a run's checkpoints; a --hf checkpoint has one")
                run = inference.load_pretrained(args.hf)
            else:
                run = inference.load(args.workdir, average=args.average)
            run = inference.quantize_run(run, args.quantize) if args.quantize else run
        if run.task.name != "seq2seq":
            raise ValueError(f"{args.workdir or args.hf} holds a {run.task.name} model; translate needs an encoder-decoder")
    except inference.USER_ERRORS as e:
        return cli.fail("translate", e)
    lines, bad = read_lines(getattr(sys.stdin, "buffer", sys.stdin))
    for number in bad:
        cli.fail("translate", f"input line {number} is not UTF-8; its output line is left empty")
    problems = []

    def warn(message):
        problems.append(message)
        cli.fail("translate", message)

    outputs = inference.translate_texts(run, lines, beam_size=args.beam_size, alpha=args.alpha,
                                        max_len=args.max_len, batch_size=args.batch_size, warn=warn)  # fmt: skip
    for text in outputs:
        print(text, flush=True)
    return 2 if bad or any("cannot be encoded" in p for p in problems) else 0

if __name__ == "__main__":
    sys.exit(main())
