"""A trained run, loaded back from its workdir, and the evaluations the CLIs report.

``load(workdir)`` rebuilds the model and dataset from the workdir's
``config.json`` and restores the newest checkpoint's parameters (read-only:
nothing in the workdir changes); ``load(workdir, average=N)`` averages the
parameters of the newest N checkpoints, as the paper does for its base models
("a single model obtained by averaging the last 5 checkpoints", section 6.1). ``tfm.evaluate``, ``tfm.generate`` and
``tfm.translate`` are thin shells over this module.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tfm import decode
from tfm.checkpoint import Checkpointer
from tfm.data import DATASETS


@dataclasses.dataclass
class Run:
    trainer: object  # tfm.trainer.Trainer, built with workdir=None
    params: object
    step: int
    workdir: str
    averaged_steps: tuple[int, ...] = ()  # the checkpoints whose parameters were averaged, if any

    @property
    def model(self):
        return self.trainer.model

    @property
    def dataset(self):
        return self.trainer.dataset


def load(workdir: str, step: int | None = None, average: int = 1) -> Run:
    """The run in ``workdir`` at its newest checkpoint (or ``step``), on this host's devices.

    ``average=N > 1``: the element-wise mean of the parameters of the newest N
    checkpoints up to that step (all N must exist and restore).
    """
    if average < 1:
        raise ValueError(f"average={average}: must be >= 1")
    from tfm.trainer import Trainer

    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{workdir} is not a tfm workdir: it has no config.json")
    with open(path, encoding="utf-8") as f:
        config = ml_collections.ConfigDict(json.load(f))
    # Inference runs on whatever devices this host has: one data-parallel mesh.
    with config.unlocked():
        for axis in ("fsdp", "tensor", "expert"):
            config.mesh[axis] = 1
        config.mesh.data = 1
        config.distributed.enabled = False
        # The tokenizer saved beside the checkpoints, not whatever a cache holds now.
        saved_tokenizer = os.path.join(workdir, "tokenizer.model")
        options = getattr(DATASETS.get(config.data.get("name")), "OPTIONS", {})
        if os.path.isfile(saved_tokenizer) and "tokenizer_path" in options:
            config.data.tokenizer_path = saved_tokenizer
    trainer = Trainer(config, devices=jax.devices()[:1])
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        restored = ckpt.restore(trainer.abstract_state, step=step)
        if restored is None:
            raise FileNotFoundError(f"{workdir} has no checkpoint yet")
        found, state, _ = restored
        params, averaged = state.params, ()
        if average > 1:
            steps = [s for s in ckpt.all_steps() if s <= found][-average:]
            if len(steps) < average:
                raise ValueError(f"average={average}: {workdir} holds only {len(steps)} checkpoints up to step {found}: {steps}")
            total = jax.tree.map(lambda x: x.astype(jnp.float32), params)
            for s in steps[:-1]:
                other = ckpt.restore(trainer.abstract_state, step=s)[1].params
                total = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), total, other)
            params = jax.tree.map(lambda t, p: (t / len(steps)).astype(p.dtype), total, params)
            averaged = tuple(steps)
    finally:
        ckpt.close()
    return Run(trainer, params, found, os.path.abspath(workdir), averaged)


def exact_match(pred: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per row: every weighted target position (the tokens and the EOS) predicted exactly."""
    width = min(pred.shape[1], targets.shape[1])
    ok = (pred[:, :width] == targets[:, :width]) | (weights[:, :width] == 0)
    return ok.all(axis=1) & (weights[:, width:] == 0).all(axis=1)


def evaluate_run(run: Run, split: str = "validation", batches: int = 8, beam_size: int = 0, alpha: float = 0.6) -> dict:
    """Loss/accuracy (teacher-forced) on ``batches`` batches (0: the whole split, where the dataset
    is finite); for seq2seq also decoded exact match."""
    trainer = run.trainer
    result = {k.replace("eval/", ""): v for k, v in trainer.evaluate(run.params, batches or -1, split).items()}
    if trainer.task == "seq2seq" and hasattr(run.dataset, "references"):
        result.update(bleu(run, split, batches, beam_size or 0, alpha))
    elif trainer.task == "seq2seq":
        ds = run.dataset
        it = ds.iterator(split)
        matches, n = 0, 0
        for _ in range(batches):
            batch = next(it)
            pred = translate_ids(run, batch["inputs"], beam_size, alpha, batch["targets"].shape[1])
            em = exact_match(np.asarray(pred), batch["targets"], batch["weights"])
            matches, n = matches + int(em.sum()), n + len(em)
        result["exact_match"] = matches / n
        result["decoding"] = f"beam {beam_size}, alpha {alpha}" if beam_size else "greedy"
        result["examples"] = n
    return result


def translate_ids(run: Run, src: np.ndarray, beam_size: int, alpha: float, max_len: int) -> np.ndarray:
    ds = run.dataset
    if beam_size:
        out, _ = decode.beam_search(run.model, run.params, jnp.asarray(src), beam_size=beam_size, alpha=alpha,
                                    max_len=max_len, bos_id=ds.bos_id, eos_id=ds.eos_id, pad_id=ds.pad_id)  # fmt: skip
    else:
        out = decode.generate_seq2seq(run.model, run.params, jnp.asarray(src), max_len=max_len, bos_id=ds.bos_id,
                                      eos_id=ds.eos_id, pad_id=ds.pad_id)  # fmt: skip
    return np.asarray(out)


def bleu(run: Run, split: str, batches: int, beam_size: int, alpha: float) -> dict:
    """sacreBLEU (cased and lowercased) of decoded, detokenized outputs against the raw references."""
    import sacrebleu

    ds = run.dataset
    n_batches = batches or ds.num_batches(split)
    refs = ds.references(split)
    hyps = []
    for i in range(n_batches):
        batch = ds.batch(split, i)
        out = translate_ids(run, batch["inputs"], beam_size, alpha, ds.max_len)
        hyps += [ds.decode(row) for row, w in zip(out, batch["weights"][:, 0]) if w > 0]
    refs = refs[: len(hyps)]
    cased_metric, lower_metric = sacrebleu.BLEU(), sacrebleu.BLEU(lowercase=True)
    cased = cased_metric.corpus_score(hyps, [refs])
    lower = lower_metric.corpus_score(hyps, [refs])
    return {
        "bleu": cased.score,
        "bleu_lowercase": lower.score,
        "bleu_signature": str(cased_metric.get_signature()),
        "bleu_lowercase_signature": str(lower_metric.get_signature()),
        "decoding": f"beam {beam_size}, alpha {alpha}" if beam_size else "greedy",
        "examples": len(hyps),
        "samples": [{"hyp": h, "ref": r} for h, r in list(zip(hyps, refs))[:3]],
    }


def result_record(run: Run, metrics: dict, **extra) -> dict:
    """What ``tfm.evaluate`` writes: the metrics plus enough to know where they came from."""
    with open(os.path.join(run.workdir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    dev = jax.devices()[0]
    return {
        "metrics": metrics,
        "checkpoint_step": run.step,
        **({"averaged_checkpoints": list(run.averaged_steps)} if run.averaged_steps else {}),
        "model": cfg["model"],
        "data": cfg["data"],
        "device": f"{dev.platform}: {dev.device_kind}",
        "host": platform.machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
