"""``python -m tfm.generate (--workdir DIR | --hf CHECKPOINT) --prompt "..." [--max_new_tokens 200] [--temperature 0.8] [--top_k 0] [--top_p 1.0] [--seed 0] [--num_samples 1] [--quantize int8|int8_dynamic]``.

Continues a prompt with a trained decoder-only run, or with a Hugging Face
checkpoint (``--hf``: a directory, or a hub repo id with ``huggingface_hub``),
using the KV cache. ``--temperature 0`` is greedy. The run's (or the
checkpoint's) own tokenizer encodes the prompt and decodes the output; a
checkpoint's sequences stop at its EOS token. Exit status: 0 done, 2 bad arguments, prompt or workdir.
"""

from __future__ import annotations

import functools
import sys

from tfm import cli


def main(argv: list[str] | None = None) -> int:
    p = cli.Parser(prog="python -m tfm.generate", description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a tfm training run")
    source.add_argument("--hf", help="a Hugging Face checkpoint directory (or hub repo id)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max_new_tokens", type=cli.int_at_least(0), default=200)
    p.add_argument("--temperature", type=cli.float_at_least(0.0, "0: greedy"), default=0.8)
    p.add_argument("--top_k", type=cli.int_at_least(0, "0: off"), default=0)
    p.add_argument("--top_p", type=cli.float_at_least(0.0, "1: off", high=1.0, open_low=True), default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_samples", type=cli.int_at_least(1), default=1)
    p.add_argument("--quantize", choices=("int8", "int8_dynamic"), default=None,
                   help="int8 weights (int8), or int8 weights and activations (int8_dynamic), after loading")
    args = p.parse_args(argv)
    cli.quiet_libraries()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from tfm import decode, inference

    try:
        with cli.stdout_to_stderr():
            run = inference.load(args.workdir) if args.workdir else inference.load_pretrained(args.hf)
            run = inference.quantize_run(run, args.quantize) if args.quantize else run
        if run.task.name not in ("lm", "lm_memory"):
            raise ValueError(f"{args.workdir or args.hf} holds a {run.task.name} model; generate needs a decoder-only LM")
        ids = run.dataset.encode(args.prompt)
    except KeyError as e:
        return cli.fail("generate", f"the prompt's character {e} is not in the run's vocabulary")
    except inference.USER_ERRORS as e:
        return cli.fail("generate", e)
    if ids.size == 0:
        return cli.fail("generate", "the prompt is empty")
    cfg = run.model.config
    if args.top_k > cfg.vocab_size:
        return cli.fail("generate", f"--top_k {args.top_k}: the vocabulary has only {cfg.vocab_size} tokens")
    window = cfg.max_len if getattr(cfg, "position", None) == "learned" else None
    sample = decode.generate
    if run.task.name == "lm_memory":
        # A compressed memory takes states in groups: read the text in the training run's segments.
        segment = run.config.data.block_size if getattr(cfg, "cmem_len", 0) else None
        sample = functools.partial(decode.generate_with_memory, segment_len=segment)
    dropped = ids[:0]
    if window is not None and ids.size >= window:
        print(f"generate: the prompt has {ids.size} tokens but the model sees at most {window}; "
              f"continuing from its last {window // 2}", file=sys.stderr)  # fmt: skip
        # Keep the prompt's end, as the model can only see `window` tokens; the output still shows all of it.
        dropped, ids = ids[: -(window // 2)], ids[-(window // 2) :]
    # A checkpoint's tokenizer knows its EOS: its sequences end there (pad after it, dropped when printed).
    eos = getattr(run.dataset, "eos_id", None) if args.hf else None
    pad = eos if eos is not None else 0
    seq = np.tile(ids[None], (args.num_samples, 1))
    key = jax.random.key(args.seed)
    remaining = args.max_new_tokens
    while remaining > 0:
        # With learned positions the model sees at most max_len tokens: like nanoGPT's cropping,
        # continue from the last max_len/2 tokens once the window is full.
        context = seq if window is None or seq.shape[1] + remaining <= window else seq[:, -(window // 2) :]
        n = remaining if window is None else min(remaining, window - context.shape[1])
        key, sub = jax.random.split(key)
        out = sample(run.model, run.params, jnp.asarray(context), sub, max_new_tokens=n,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_id=eos,
                              pad_id=pad)  # fmt: skip
        seq = np.concatenate([seq, np.asarray(out)[:, context.shape[1] :]], axis=1)
        remaining -= n
        if eos is not None and (seq[:, ids.size :] == eos).any(axis=1).all():
            break  # every sample has ended
    for row in seq:
        print(run.dataset.decode(np.concatenate([dropped, row])))
        if args.num_samples > 1:
            print("---")
    return 0


if __name__ == "__main__":
    sys.exit(main())
