"""The teacher of a distilled run: ``distill.teacher=[workdir:]DIR`` or ``hf:DIR`` (see ``tfm.distill``).

A tfm workdir's newest checkpoint, or a Hugging Face checkpoint read through ``tfm.hub``.
Only the parameters are restored (no optimizer state), onto the student's mesh and
sharded by their logical axes. The teacher must predict over the same outputs as the
student (the same task, tokenizer and vocabulary): anything else is refused before training.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax

from tfm import inference, storage, warm_start
from tfm.config import ConfigError
from tfm.distill import Distillation
from tfm.step import forward

if TYPE_CHECKING:
    from tfm.tasks import Task

log = logging.getLogger("tfm")



def _same_tokenizer(workdir: str, artifacts: dict[str, bytes], source: str) -> None:
    for name, content in artifacts.items():
        path = storage.join(workdir, name)
        if storage.isfile(path) and storage.read_bytes(path) != content:
            raise ConfigError(f"distill.teacher={source!r}: its {name} differs from this run's; "
                              f"the teacher must read the same tokens as the student")  # fmt: skip


def load_teacher(config, task: Task, student: nn.Module, student_params: Any, example: dict, mesh,
                 artifacts: dict[str, bytes]) -> tuple[Distillation, Any]:  # fmt: skip
    """``(Distillation, teacher_params)`` for ``config.distill``, the parameters placed on ``mesh``.

    ``student_params`` may be abstract (``ShapeDtypeStruct``s); ``example`` is a batch of the student's data.

    ``ConfigError`` when the teacher cannot teach this student: no checkpoint, another task,
    another tokenizer, or logits of another shape on the student's batches.
    """
    d = config.distill
    source = d.teacher
    kind, path = warm_start.parse(source)
    try:
        if kind == "hf":
            from tfm import hub
            from tfm.models import PRESETS

            model, params = hub.from_pretrained(path, mesh=mesh, dropout_rate=0.0)
            teacher_task = next((p.task for p in PRESETS.values() if p.model_cls is type(model)), None)
            origin = f"Hugging Face checkpoint {path}"
        else:
            run = inference.load(storage.resolve(path, "distill.teacher"), mesh=mesh)
            _same_tokenizer(run.workdir, artifacts, source)
            model, params, teacher_task = run.model, run.params, run.task.name
            origin = f"{run.workdir} at step {run.step}"
    except (FileNotFoundError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"distill.teacher={source!r}: {e}") from e
    if teacher_task != task.name:
        raise ConfigError(f"distill.teacher={source!r}: a {teacher_task} model cannot teach this {task.name} student")
    shape = lambda m, p: jax.eval_shape(lambda p: forward(m, task, p, example, train=False)[0], p).shape  # noqa: E731
    theirs, ours = shape(model, params), shape(student, student_params)
    if theirs != ours:
        raise ConfigError(f"distill.teacher={source!r}: its logits are {list(theirs)} where the student's are "
                          f"{list(ours)}; teacher and student must share the vocabulary (or classes)")  # fmt: skip
    n = sum(x.size for x in jax.tree.leaves(params))
    log.info("distilling from %s (%s, %s parameters), alpha %s, temperature %s",
             origin, type(model).__name__, f"{n:,}", d.alpha, d.temperature)  # fmt: skip
    return Distillation(model, float(d.alpha), float(d.temperature)), params


__all__ = ["load_teacher"]
