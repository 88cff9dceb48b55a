"""``python -m tfm.export --workdir DIR --out OUT [--step N] [--average 1] [--no_ema] [--dtype float32|bfloat16|float16] [--format auto|hf|orbax]``.

A parameters-only export of a trained run (no optimizer state):

* ``hf`` (the default where the family has a Hugging Face layout: GPT-2, Llama,
  Mistral, Mixtral, BERT, T5, ViT, Marian): ``config.json`` + ``model.safetensors``,
  which ``transformers``' ``from_pretrained`` and ``tfm.hub.from_pretrained`` read.
* ``orbax`` (every model): ``OUT/params``, an orbax checkpoint of the parameter
  tree, beside ``OUT/tfm_config.json`` (the run's config) for ``tfm.inference``-style rebuilding.

Either way the run's tokenizer file (``tokenizer.json``, ``tokenizer.model`` or
``vocab.json``) is copied beside it. The export is written to a temporary
folder next to ``OUT`` and renamed into place when complete; an existing
non-empty ``OUT`` is refused. Exit status: 0 done, 2 bad arguments or workdir.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

from tfm import cli

DTYPES = ("float32", "bfloat16", "float16")


def export(run, out: str, fmt: str = "auto", dtype: str | None = None) -> str:
    """Write ``run``'s parameters to ``out`` (which must not hold files); returns the format written."""
    import jax
    import jax.numpy as jnp

    from tfm import hub, storage
    from tfm.workdir import ARTIFACTS

    out = storage.resolve(out, "--out")
    if storage.listdir(out):
        raise ValueError(f"--out {out}: exists and is not empty; give a new directory")
    if fmt == "auto":
        fmt = "hf" if any(m.ARCHITECTURE.claims(run.model, run.model.config) for m in hub._FAMILIES) else "orbax"
    # Written whole into a temporary folder, then renamed (or, for a cloud --out, uploaded) into place.
    remote = storage.is_remote(out)
    parent = tempfile.gettempdir() if remote else os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        params = run.params
        if dtype is not None:
            cast = jnp.dtype(dtype)
            params = jax.tree.map(lambda x: x.astype(cast) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
        if fmt == "hf":
            hub.save_pretrained(run.model, params, tmp)
        else:
            import orbax.checkpoint as ocp

            with ocp.StandardCheckpointer() as ckpt:
                ckpt.save(os.path.join(tmp, "params"), params)
            with open(os.path.join(tmp, "tfm_config.json"), "w") as f:
                json.dump(run.config.to_dict(), f, indent=2, sort_keys=True, default=str)
        for name in ARTIFACTS:
            if storage.isfile(storage.join(run.workdir, name)):
                storage.write_atomic(os.path.join(tmp, name), storage.read_bytes(storage.join(run.workdir, name)))
        if remote:
            storage.upload_tree(tmp, out)
        else:
            if os.path.isdir(out):
                os.rmdir(out)  # empty, checked above
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return fmt


def main(argv: list[str] | None = None) -> int:
    p = cli.Parser(prog="python -m tfm.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--step", type=cli.int_at_least(0), default=None, help="the checkpoint (default: the newest)")
    p.add_argument("--average", type=cli.int_at_least(1), default=1,
                   help="average the parameters of the newest N checkpoints")
    p.add_argument("--no_ema", action="store_true",
                   help="the last parameters, not their moving average (a run with optim.ema_decay > 0)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="cast floating parameters (default: as trained)")
    p.add_argument("--format", choices=("auto", "hf", "orbax"), default="auto",
                   help="auto: Hugging Face layout where the family has one, else orbax")
    args = p.parse_args(argv)
    cli.quiet_libraries()

    from tfm import hub, inference

    try:
        with cli.stdout_to_stderr():
            run = inference.load(args.workdir, step=args.step, average=args.average, ema=not args.no_ema)
            fmt = export(run, args.out, args.format, args.dtype)
    except (*inference.USER_ERRORS, hub.HubError) as e:
        return cli.fail("export", e)
    print(f"exported step {run.step} of {args.workdir} to {args.out} ({fmt})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
