"""A trained run, loaded back from its workdir, and the evaluations the CLIs report.

``load(workdir)`` rebuilds the model and dataset from the workdir's
``config.json`` and tokenizer and restores the newest checkpoint's parameters.
Loading only reads: nothing in the workdir is written, moved or deleted, so a
run can be evaluated while it trains; ``load(workdir, average=N)`` averages the
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
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tfm import config as config_lib
from tfm import data as data_lib
from tfm import decode, placement, storage
from tfm import loop as loop_lib
from tfm import sharding as sh
from tfm import tasks as tasks_lib
from tfm.checkpoint import Checkpointer, CheckpointError
from tfm.data import DATASETS
from tfm.step import make_eval_step
from tfm.workdir import ARTIFACTS, read_config

# What a reader command reports as one line (exit 2) instead of a traceback: a missing or
# unreadable workdir or file, a bad config or data, checkpoints that cannot be restored.
USER_ERRORS = (OSError, ValueError, CheckpointError)


@dataclasses.dataclass
class Run:
    """A trained model restored for inference: its parameters only (no optimizer state), on ``mesh``."""

    config: ml_collections.ConfigDict
    model: object  # the flax module
    task: tasks_lib.Task
    dataset: object  # the run's dataset: the tokenizer, the splits to evaluate
    params: object
    step: int
    workdir: str
    mesh: jax.sharding.Mesh
    rules: tuple
    averaged_steps: tuple[int, ...] = ()  # the checkpoints whose parameters were averaged, if any
    # Extra arguments of the seq2seq decoders: a Hugging Face checkpoint's generation rules (``tfm.decode``).
    decode_options: dict = dataclasses.field(default_factory=dict)
    quantized: str = ""  # a mode of tfm.quantize when the parameters were quantized after loading
    ema: bool = False  # the parameters are the run's moving average (optim.ema_decay), not its last ones

    def evaluate(self, steps: int = -1, split: str = "validation", flip: bool = False) -> dict:
        """Teacher-forced loss, accuracy (and perplexity) over ``steps`` batches of ``split`` (-1: all of it);
        ``flip``: each image's prediction averaged with its mirror's (``step.make_eval_step``)."""
        place = placement.BatchPlacer(self.mesh, self.rules, self.config.data.batch_size)
        eval_step = jax.jit(make_eval_step(self.model, self.task, flip=flip))
        if self.task.recurrent:  # the memory goes from each batch to the next
            rows = self.config.data.batch_size
            eval_step = loop_lib.CarriedEval(eval_step, lambda: nn.unbox(self.task.init_carry(self.model.config, rows)))
        return loop_lib.evaluate(eval_step, self.params, self.dataset, place, steps=steps, split=split,
                                 token_level=self.task.token_level,
                                 context=lambda: placement.mesh_context(self.mesh, self.rules))  # fmt: skip


def _inference_config(workdir: str, mesh: jax.sharding.Mesh | None) -> ml_collections.ConfigDict:
    saved = read_config(workdir)
    if saved is None:
        raise FileNotFoundError(f"{workdir} is not a tfm workdir: it has no config.json")
    config = ml_collections.ConfigDict(saved)
    with config.unlocked():
        for axis in sh.MESH_AXES:  # the caller's mesh, or one device
            config.mesh[axis] = 1 if mesh is None else int(mesh.shape.get(axis, 1))
        config.distributed.enabled = False
        # The tokenizer saved beside the checkpoints, not whatever the data or a cache holds now.
        options = getattr(DATASETS.get(config.data.get("name")), "OPTIONS", {})
        for name in ARTIFACTS:
            if storage.isfile(storage.join(workdir, name)) and "tokenizer_path" in options:
                config.data.tokenizer_path = storage.join(workdir, name)
    return config


def load(workdir: str, step: int | None = None, average: int = 1, *, dtype: jnp.dtype | None = None,
         mesh: jax.sharding.Mesh | None = None, ema: bool = True) -> Run:  # fmt: skip
    """The run in ``workdir`` at its newest checkpoint (or ``step``): parameters only.

    ``mesh``: where the parameters go, sharded by their logical axes (default: one
    device of this host). ``dtype``: cast floating parameters (``jnp.bfloat16`` halves
    their memory). ``average=N > 1``: the element-wise mean of the parameters of the
    newest N checkpoints up to that step (all N must exist and restore). A run that keeps a
    moving average of its parameters (``optim.ema_decay``) gives the average, unless ``ema=False``.
    """
    if average < 1:
        raise ValueError(f"average={average}: must be >= 1")
    workdir = storage.resolve(workdir, "workdir")
    config = _inference_config(workdir, mesh)
    ckpt_dir = storage.join(workdir, "checkpoints")
    if not any(d.isdigit() for d in storage.listdir(ckpt_dir)):
        raise FileNotFoundError(f"{workdir} has no checkpoint yet")
    devices = jax.devices()[:1] if mesh is None else list(mesh.devices.flat)
    preset, model_config, sizes, rules = config_lib.validate(config, len(devices), 1)
    if preset.task is None:
        raise ValueError(f"{workdir}: model.preset={config.model.preset!r} has no task to run")
    task = tasks_lib.get_task(preset.task)
    dataset = data_lib.make_dataset(config.data.to_dict())
    model = preset.model_cls(model_config)
    mesh = sh.make_mesh(sizes, devices) if mesh is None else mesh
    example = {k: jnp.asarray(v) for k, v in dataset.batch("train", 0, batch_size=1).items()}
    args, kwargs = task.model_args(example)
    abstract, _ = placement.abstract_state(lambda key: model.init({"params": key}, *args, **kwargs)["params"], mesh, rules)
    if dtype is not None:
        cast = lambda a: jax.ShapeDtypeStruct(a.shape, dtype if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype,
                                              sharding=a.sharding)  # noqa: E731
        abstract = jax.tree.map(cast, abstract)
    ema = ema and config.optim.get("ema_decay", 0.0) > 0
    part = "ema_params" if ema else "params"
    ckpt = Checkpointer(ckpt_dir, read_only=True)  # never cleans up: that would delete a live run's save
    try:
        restored = ckpt.restore(abstract, step=step, params_only=True, part=part)
        if restored is None:
            raise FileNotFoundError(f"{workdir} has no checkpoint yet")
        found, params, _ = restored
        averaged = ()
        if average > 1:
            steps = [s for s in ckpt.all_steps() if s <= found][-average:]
            if len(steps) < average:
                raise ValueError(f"average={average}: {workdir} holds only {len(steps)} checkpoints up to step {found}: {steps}")
            total = jax.tree.map(lambda x: x.astype(jnp.float32), params)
            for s in steps[:-1]:
                other = ckpt.restore(abstract, step=s, params_only=True, part=part)[1]
                total = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), total, other)
            params = jax.tree.map(lambda t, p: (t / len(steps)).astype(p.dtype), total, params)
            averaged = tuple(steps)
    finally:
        ckpt.close()
    return Run(config, model, task, dataset, params, found, workdir, mesh, rules, averaged, ema=ema)


def quantize_run(run: Run, mode: str) -> Run:
    """``run`` with its model and parameters quantized to int8 (``tfm.quantize``: ``int8`` or ``int8_dynamic``)."""
    from tfm import quantize
    from tfm.models import PRESETS

    preset = next(p for p in PRESETS.values() if p.model_cls is type(run.model))
    model, params = quantize.quantize(run.model, run.params, mode, *preset.example_inputs(run.model.config))
    return dataclasses.replace(run, model=model, params=params, quantized=mode)


def load_pretrained(path_or_repo_id: str, *, dtype: jnp.dtype | None = None,
                    mesh: jax.sharding.Mesh | None = None) -> Run:  # fmt: skip
    """A Hugging Face checkpoint (``tfm.hub``) as a ``Run`` for the decoding CLIs: its own tokenizer
    stands in for the dataset (``encode``, ``decode``, ``bos_id``/``eos_id``/``pad_id``)."""
    from tfm import hub
    from tfm.hub import files
    from tfm.hub.tokenizer import load_tokenizer
    from tfm.models import PRESETS

    directory = files.resolve(path_or_repo_id)
    devices = jax.devices()[:1]
    mesh = sh.make_mesh({"data": 1}, devices) if mesh is None else mesh
    model, params = hub.from_pretrained(directory, dtype=dtype, mesh=mesh)
    task = next((p.task for p in PRESETS.values() if p.model_cls is type(model) and p.task), None)
    if task is None:
        raise ValueError(f"{directory}: a {type(model).__name__} has no task tfm decodes or evaluates")
    tokenizer = load_tokenizer(directory)
    return Run(None, model, tasks_lib.get_task(task), tokenizer, params, 0, os.path.abspath(directory), mesh,
               sh.make_rules(), decode_options=generation_rules(directory))  # fmt: skip


def generation_rules(directory: str) -> dict:
    """The seq2seq decoders' options that reproduce a checkpoint's ``generate`` (``config.json``, then
    ``generation_config.json``): tokens it bans (``bad_words_ids`` of length 1, Marian's pad), an EOS
    forced at the last position, and transformers' rule that only an EOS among a step's best K
    candidates finishes a beam."""
    rules: dict = {}
    for name in ("config.json", "generation_config.json"):
        if os.path.isfile(os.path.join(directory, name)):
            with open(os.path.join(directory, name)) as f:
                rules.update({k: v for k, v in json.load(f).items() if v is not None})
    banned = tuple(int(w[0]) for w in rules.get("bad_words_ids") or [] if len(w) == 1)
    options: dict = {"finish_top_k_only": True}
    if banned:
        options["suppress_ids"] = banned
    if rules.get("forced_eos_token_id") is not None:
        options["force_eos"] = True
    return options


def exact_match(pred: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per row: every weighted target position (the tokens and the EOS) predicted exactly."""
    width = min(pred.shape[1], targets.shape[1])
    ok = (pred[:, :width] == targets[:, :width]) | (weights[:, :width] == 0)
    return ok.all(axis=1) & (weights[:, width:] == 0).all(axis=1)


def evaluate_run(run: Run, split: str = "validation", batches: int = 8, beam_size: int = 0, alpha: float = 0.6,
                 max_len: int = 128, batch_size: int = 32, flip: bool = False) -> dict:
    """Loss/accuracy (teacher-forced) on ``batches`` batches (0: the whole split, where the dataset
    is finite); for seq2seq also decoded exact match, or sacreBLEU where the dataset has references;
    for speech the character and word error rates of the decoded transcripts (``tfm.asr``); for
    detection AP@0.5 (``tfm.detection``).

    BLEU decodes the full source sentences exactly as ``tfm.translate`` does (``max_len``
    output tokens, ``batch_size`` sentences per decoding batch), so it equals scoring
    ``tfm.translate``'s output with sacreBLEU. ``flip``: image classification averages each
    image's prediction with its mirror's.
    """
    result = {k.replace("eval/", ""): v for k, v in run.evaluate(batches or -1, split, flip=flip).items()}
    if run.task.name == "seq2seq" and hasattr(run.dataset, "references"):
        result.update(bleu(run, split, batches, beam_size or 0, alpha, max_len, batch_size))
    elif run.task.name == "speech":
        from tfm import asr

        transcribe = lambda x, n: translate_ids(run, x, beam_size or 0, alpha, n)  # noqa: E731
        result.update(asr.evaluate(run, split, transcribe, batches))
        result["decoding"] = f"beam {beam_size}, alpha {alpha}" if beam_size else "greedy"
    elif run.task.name == "contrastive" and hasattr(run.dataset, "class_prompts"):
        from tfm import zero_shot

        result.update(zero_shot.evaluate(run, split, batches))
    elif run.task.name == "detect":
        from tfm import detection

        result.update(detection.evaluate(run, split, batches))
    elif run.task.name == "seq2seq":
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
                                    max_len=max_len, bos_id=ds.bos_id, eos_id=ds.eos_id, pad_id=ds.pad_id,
                                    **run.decode_options)  # fmt: skip
    else:
        options = {k: v for k, v in run.decode_options.items() if k != "finish_top_k_only"}
        out = decode.generate_seq2seq(run.model, run.params, jnp.asarray(src), max_len=max_len, bos_id=ds.bos_id,
                                      eos_id=ds.eos_id, pad_id=ds.pad_id, **options)  # fmt: skip
    return np.asarray(out)


def translate_texts(run: Run, texts: Iterable[str], *, beam_size: int = 4, alpha: float = 0.6, max_len: int = 128,
                    batch_size: int = 32, warn: Callable[[str], None] | None = None) -> Iterator[str]:
    """Yield one translation per text, in order: what ``tfm.translate`` prints.

    Sources are decoded whole (a model with learned positions sees at most its
    ``max_len`` source tokens; ``warn`` is called once with what was cut). A
    blank text, or one the vocabulary cannot encode (``warn`` names its line),
    gives an empty line. Rows and the batch are padded to fixed
    shapes (widths in multiples of 16), so few programs are compiled.
    """
    ds, cfg = run.dataset, run.model.config
    limit = cfg.max_len if getattr(cfg, "position", "") == "learned" else None
    max_len = min(max_len, limit) if limit else max_len
    texts = list(texts)
    cut = 0
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        encoded = []
        for i, text in enumerate(chunk, start=start + 1):
            try:
                encoded.append(ds.encode(text) if text.strip() else None)
            except (KeyError, ValueError) as e:  # a symbol the vocabulary lacks
                encoded.append(None)
                if warn is not None:
                    warn(f"input line {i} cannot be encoded ({type(e).__name__}: {e}); its output line is left empty")
        if limit:
            cut += sum(1 for x in encoded if x is not None and len(x) > limit)
            encoded = [x if x is None else x[:limit] for x in encoded]
        width = max([len(x) for x in encoded if x is not None] + [1])
        width = -(-width // 16) * 16
        src = np.full((batch_size, width), ds.pad_id, np.int32)
        for i, x in enumerate(encoded):
            if x is not None:
                src[i, : len(x)] = x
        out = translate_ids(run, src, beam_size, alpha, max_len) if any(x is not None for x in encoded) else None
        for i, x in enumerate(encoded):
            yield "" if x is None else ds.decode(out[i])
    if cut and warn is not None:
        warn(f"{cut} source(s) longer than the model's {limit} positions were cut to {limit} tokens")


def bleu(run: Run, split: str, batches: int, beam_size: int, alpha: float, max_len: int = 128,
         batch_size: int = 32) -> dict:
    """sacreBLEU (cased and lowercased) of the detokenized translations of the first ``batches`` x
    ``data.batch_size`` source sentences of ``split`` (0: all of them) against the raw references."""
    import sacrebleu

    ds = run.dataset
    sources, refs = ds.sources(split), ds.references(split)
    if batches:
        sources, refs = sources[: batches * ds.batch_size], refs[: batches * ds.batch_size]
    notes = []
    hyps = list(translate_texts(run, sources, beam_size=beam_size, alpha=alpha, max_len=max_len,
                                batch_size=batch_size, warn=notes.append))  # fmt: skip
    cased_metric, lower_metric = sacrebleu.BLEU(), sacrebleu.BLEU(lowercase=True)
    cased = cased_metric.corpus_score(hyps, [refs])
    lower = lower_metric.corpus_score(hyps, [refs])
    decoding = f"beam {beam_size}, alpha {alpha}" if beam_size else "greedy"
    return {
        "bleu": cased.score,
        "bleu_lowercase": lower.score,
        "bleu_signature": str(cased_metric.get_signature()),
        "bleu_lowercase_signature": str(lower_metric.get_signature()),
        "decoding": f"{decoding}, at most {max_len} tokens, full sources",
        "examples": len(hyps),
        **({"notes": notes} if notes else {}),
        "samples": [{"hyp": h, "ref": r} for h, r in list(zip(hyps, refs))[:3]],
    }


def _portable(data: dict) -> dict:
    """The data options without this machine's folders (a result must not depend on where files lay)."""
    out = {k: v for k, v in data.items() if not k.endswith("_dir")}
    if out.get("tokenizer_path"):
        out["tokenizer_path"] = os.path.basename(out["tokenizer_path"])
    return out


def result_record(run: Run, metrics: dict, **extra: Any) -> dict:
    """What ``tfm.evaluate`` writes: the metrics plus enough to know where they came from."""
    cfg = json.loads(storage.read_text(storage.join(run.workdir, "config.json")))
    dev = jax.devices()[0]
    return {
        "metrics": metrics,
        "checkpoint_step": run.step,
        **({"averaged_checkpoints": list(run.averaged_steps)} if run.averaged_steps else {}),
        **({"quantized": run.quantized} if run.quantized else {}),
        **({"parameters": f"moving average, optim.ema_decay={cfg['optim']['ema_decay']}"} if run.ema else {}),
        "model": cfg["model"],
        "data": _portable(cfg["data"]),
        "device": f"{dev.platform}: {dev.device_kind}",
        "host": platform.machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
