"""Run configs: the schema every recipe starts from, command-line overrides, validation.

A recipe is ``configs/<name>.py`` with ``get_config(arg)`` returning an ``ml_collections.ConfigDict``
built from ``default_config()``. The command line names it as ``--config configs/<name>.py[:arg]``
and overrides keys with ``--config.train.steps=100``. Everything is checked before anything runs;
each problem is one ``ConfigError`` naming the key and the value.

Sections:
* ``model``: ``preset`` (a name in ``tfm.models.PRESETS``) plus any field of that
  preset's config or of its block config to change, by its plain name: ``num_layers``
  (the family's), ``d_model``, ``attention``, ``num_experts``, ``dtype`` (the block's).
  ``vocab_size``, ``num_classes`` and ``num_labels`` default to the data's.
* ``data``: ``name`` (a dataset in ``tfm.data``), ``batch_size`` (global), and the dataset's own options.
* ``optim``: optimizer and learning-rate schedule; ``train``: steps, loss options, gradient
  accumulation, logging, evaluation, checkpoints.
* ``distill``: a teacher to distil from (``tfm.distill``).
* ``mesh``: mesh axis sizes (one may be -1 = the rest) and logical-axis rule overrides;
  ``distributed``: multi-process start-up (``jax.distributed.initialize``).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import traceback
from typing import TYPE_CHECKING, Any, Sequence

import ml_collections
from ml_collections import ConfigDict

from tfm import sharding as sh

if TYPE_CHECKING:
    from tfm.models import Preset
    from tfm.models.common import ModelConfig


class ConfigError(ValueError):
    """A run config that cannot run; the message names the key and the value."""


SCHEDULES = ("noam", "cosine", "linear", "rsqrt", "constant")
PROGRESS = ("auto", "bar", "lines", "none")


def default_config() -> ConfigDict:
    """Every key a run config may have, with its default. Recipes update this."""
    c = ConfigDict()
    c.seed = 0

    c.model = ConfigDict()
    c.model.preset = "gpt_tiny"

    c.data = ConfigDict()
    c.data.name = "copy"
    c.data.batch_size = 32  # global, over all processes and devices

    c.optim = ConfigDict()
    c.optim.name = "adamw"  # adam | adamw
    c.optim.learning_rate = 1e-3  # peak; ignored by noam (its peak follows from d_model and warmup)
    c.optim.schedule = "cosine"  # noam | cosine | linear | rsqrt | constant
    c.optim.warmup_steps = 100
    c.optim.noam_scale = 1.0
    c.optim.end_fraction = 0.0  # cosine/linear end at learning_rate * end_fraction
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-9
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 1.0  # <= 0: no clipping
    c.optim.ema_decay = 0.0  # > 0 (e.g. 0.999): evaluate a moving average of the parameters (TrainState.ema_params)

    c.train = ConfigDict()
    c.train.steps = 1000
    c.train.grad_accum_steps = 1  # micro-batches per step; the batch is split along its first axis
    c.train.label_smoothing = 0.0
    c.train.z_loss = 0.0
    c.train.aux_loss_weight = 1.0  # multiplies losses the layers sow into the "aux_loss" collection
    c.train.log_every = 50
    c.train.eval_every = 0  # 0: evaluate only at the end
    c.train.eval_steps = 10  # batches per evaluation; 0: no evaluation; -1: the whole (finite) split
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 3
    c.train.best_metric = ""  # e.g. "eval/loss": also keep the best checkpoint by this metric
    c.train.best_mode = "min"
    c.train.async_checkpoint = True
    c.train.progress = "auto"  # auto | bar | lines | none
    c.train.tensorboard = True
    c.train.wandb_project = ""  # a Weights & Biases project to log to as well (needs the wandb package)
    c.train.peak_flops = 0.0  # per device, for MFU; 0: look the device kind up
    c.train.profile_steps = ""  # "a:b": a jax.profiler trace of steps a..b-1 in WORKDIR/profile (TensorBoard, Perfetto)
    # Start from trained parameters (same paths, same shapes), fresh optimizer: a tfm workdir's newest
    # checkpoint ("DIR" or "workdir:DIR"), or a Hugging Face checkpoint ("hf:DIR" or "hf:REPO_ID").
    c.train.init_from = ""

    # Distillation (tfm.distill): a teacher "[workdir:]DIR" or "hf:DIR" ("" = none), the loss's alpha and T.
    c.distill = ConfigDict(dict(teacher="", alpha=0.5, temperature=2.0))

    c.mesh = ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.expert = 1
    c.mesh.rules = ConfigDict()  # {logical_name: "mesh_axis" | "axis1,axis2" | ""} over DEFAULT_RULES

    c.distributed = ConfigDict()
    c.distributed.enabled = False  # also started when JAX_COORDINATOR_ADDRESS is set
    c.distributed.auto = True  # start it where JAX detects a multi-process cluster (TPU pod, SLURM, MPI, GKE)
    c.distributed.coordinator_address = ""
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    return c


# Loading -------------------------------------------------------------------


def load_config(spec: str) -> ConfigDict:
    """``path/to/recipe.py[:arg]``, or a shipped recipe by name (``tfm:copy[:arg]`` or ``copy[:arg]``)
    -> the ConfigDict its ``get_config(arg)`` returns."""
    if spec.startswith("tfm:"):
        spec = spec[len("tfm:") :]
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path) and os.sep not in path and not path.endswith(".py"):
        from tfm import recipes

        if path not in recipes.names():
            raise ConfigError(f"--config: no such file {path!r}, and no shipped recipe of that name "
                              f"(shipped: {', '.join(recipes.names())})")  # fmt: skip
        path = recipes.path(path)
    if not os.path.isfile(path):
        raise ConfigError(f"--config: no such file {path!r}")
    module_spec = importlib.util.spec_from_file_location(f"tfm_recipe_{abs(hash(path))}", path)
    if module_spec is None:
        raise ConfigError(f"--config: {path!r} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"--config: {path}, line {e.lineno}: {e.msg}") from e
    except Exception as e:  # noqa: BLE001 - any error in the user's recipe file
        raise ConfigError(f"--config: {path} fails to load: {_where(e, path)}{type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config: {path} defines no get_config(arg)")
    try:
        config = module.get_config(arg or None)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"--config: {path}:{arg or ''} — get_config fails: {_where(e, path)}{type(e).__name__}: {e}") from e
    if not isinstance(config, ConfigDict):
        raise ConfigError(f"--config: {path}.get_config returned {type(config).__name__}, not a ConfigDict")
    return config


def _where(e: Exception, path: str) -> str:
    """``line N: `` of the innermost frame of ``e`` in ``path``, if there is one."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) == os.path.abspath(path)]
    return f"line {frames[-1].lineno}: " if frames else ""


def _parse_value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text in ("None", "none", "null"):
        return None
    if text.lower().lstrip("+-") in ("nan", "inf", "infinity"):
        return float(text)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _coerce(key: str, old: Any, new: Any) -> Any:
    """``new`` converted to the type of ``old``, or ``ConfigError`` naming the key."""
    if old is None or new is None:
        return new
    if isinstance(old, bool):
        if isinstance(new, bool):
            return new
    elif isinstance(old, int):
        if isinstance(new, int) and not isinstance(new, bool):
            return new
    elif isinstance(old, float):
        if isinstance(new, (int, float)) and not isinstance(new, bool):
            return float(new)
    elif isinstance(old, str):
        return new if isinstance(new, str) else str(new)
    elif isinstance(old, (tuple, list)):
        if isinstance(new, (tuple, list)):
            return type(old)(new)
    else:
        return new
    raise ConfigError(f"{key}={new!r}: expected {type(old).__name__} (the default is {old!r})")


def section_is_open(parents: Sequence[str]) -> bool:
    """Sections whose keys are checked later, against the preset or the dataset (``model``, ``data``, ``mesh.rules``)."""
    return ".".join(parents) in ("model", "data", "mesh.rules")


def apply_overrides(config: ConfigDict, overrides: Sequence[str]) -> ConfigDict:
    """Apply ``["train.steps=100", "model.d_model=64", ...]`` (the ``--config.`` prefix removed)."""
    config = ConfigDict(config.to_dict())  # a copy; the recipe's dict stays untouched
    for item in overrides:
        key, eq, text = item.partition("=")
        *parents, leaf = key.split(".")
        node = config
        for i, name in enumerate(parents):
            if not isinstance(node, ConfigDict) or name not in node:
                raise ConfigError(f"--config.{key}: unknown key {'.'.join(parents[: i + 1])!r}")
            node = node[name]
        if not isinstance(node, ConfigDict):
            raise ConfigError(f"--config.{key}: {'.'.join(parents)!r} is not a section")
        if not eq:  # a bare --config.KEY: a boolean switch
            if not isinstance(node.get(leaf), bool) and not (leaf not in node and section_is_open(parents)):
                raise ConfigError(f"--config.{key}: needs a value (--config.{key}=VALUE); only boolean keys "
                                  f"may stand alone")  # fmt: skip
            text = "true"
        new = _parse_value(text)
        section = ".".join(parents)
        # model.* keys and mesh.rules.* are checked against the preset / the logical names in validate().
        open_section = section_is_open(parents)
        if leaf in node and isinstance(node[leaf], str):
            with node.ignore_type():
                node[leaf] = text  # a string field takes the text as written ("none" stays "none")
        elif leaf in node:
            with node.ignore_type():
                node[leaf] = _coerce(key, node[leaf], new)
        elif open_section:
            with node.ignore_type():
                node[leaf] = new
        else:
            raise ConfigError(f"--config.{key}: unknown key; {section or 'the config'} has {sorted(node.keys())}")
    return config


# Validation ----------------------------------------------------------------


def _check_keys(config: ConfigDict, schema: ConfigDict, prefix: str = "") -> None:
    for key in config.keys():
        name = f"{prefix}{key}"
        if key not in schema:
            raise ConfigError(
                f"unknown config key {name!r}; {prefix.rstrip('.') or 'the config'} has {sorted(schema.keys())}"
            )
        value, default = config[key], schema[key]
        if isinstance(default, ConfigDict) and name not in ("model", "data", "mesh.rules"):
            if not isinstance(value, ConfigDict):
                raise ConfigError(f"config key {name!r} must be a section, got {value!r}")
            _check_keys(value, default, name + ".")
        elif not isinstance(default, ConfigDict):
            _coerce(name, default, value)


def model_config(config: ConfigDict) -> tuple[Preset, ModelConfig]:
    """The frozen model dataclass: the preset with ``config.model``'s fields replaced.

    ``model.KEY`` names a field of the preset's config or of its ``block`` (one flat
    name space, see ``tfm.models.common.ModelConfig``): ``model.num_layers``,
    ``model.d_model``, ``model.attention``, ``model.num_experts``.
    """
    from tfm.models import PRESETS
    from tfm.models.common import DTYPES

    fields = dict(config.model.to_dict())
    preset_name = fields.pop("preset", None)
    if preset_name not in PRESETS:
        raise ConfigError(f"model.preset={preset_name!r}: not a preset; choose from {sorted(PRESETS)}")
    preset = PRESETS[preset_name]
    base, family = preset.config, type(preset.config).__name__
    for key, value in fields.items():
        if key in base.DERIVED:
            raise ConfigError(f"model.{key}={value!r}: {family} sets {key} itself from its other fields")
        if key not in base.field_names():
            raise ConfigError(f"model.{key}={value!r}: {family} (and its block) has no field {key!r}")
        if key in ("dtype", "param_dtype"):
            if value not in DTYPES:
                raise ConfigError(f"model.{key}={value!r}: choose from {sorted(DTYPES)}")
            fields[key] = DTYPES[value]
        else:
            fields[key] = _coerce(f"model.{key}", base.get(key), value)
    if ("d_model" in fields or "num_heads" in fields) and fields.get("head_dim", base.get("head_dim")) is None:
        d, n = fields.get("d_model", base.get("d_model")), fields.get("num_heads", base.get("num_heads"))
        if n <= 0 or d % n:
            raise ConfigError(f"model.d_model={d} is not divisible by model.num_heads={n}")
    try:
        return preset, base.replace(**fields)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model: {e}") from e


FLOAT32_MAX = 3.4028234663852886e38


def _check_optimizer_numbers(o: ConfigDict, t: ConfigDict, d: ConfigDict) -> None:
    """Settings that make the first update non-finite or meaningless are refused before anything runs."""

    def finite(key, value, low=None, high=None, low_open=False, high_open=False):
        ok = isinstance(value, (int, float)) and math.isfinite(value) and abs(value) <= FLOAT32_MAX
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            lo = "" if low is None else f"{'(' if low_open else '['}{low}"
            hi = "" if high is None else f"{high}{')' if high_open else ']'}"
            where = f" in {lo}, {hi}" if lo and hi else (f" >{'' if low_open else '='} {low}" if lo else "")
            raise ConfigError(f"{key}={value!r}: must be a finite float32 number{where}")

    finite("optim.learning_rate", o.learning_rate, low=0.0)
    finite("optim.noam_scale", o.noam_scale, low=0.0, low_open=True)
    finite("optim.end_fraction", o.end_fraction, low=0.0, high=1.0)
    for key in ("b1", "b2", "ema_decay"):  # older workdirs lack ema_decay
        finite(f"optim.{key}", o.get(key, 0.0), low=0.0, high=1.0, high_open=True)
    finite("optim.clip_norm", o.clip_norm)
    for key, value in (("optim.eps", o.eps), ("optim.weight_decay", o.weight_decay), ("train.z_loss", t.z_loss),
                       ("train.aux_loss_weight", t.aux_loss_weight)):  # fmt: skip
        finite(key, value, low=0.0)
    finite("distill.alpha", d.alpha, low=0.0, high=1.0)
    finite("distill.temperature", d.temperature, low=0.0, low_open=True)
    try:
        from tfm.loop import profile_window

        profile_window(t.get("profile_steps", ""))
        if t.get("wandb_project"):
            from tfm.metrics import import_wandb

            import_wandb(t.wandb_project)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def validate(
    config: ConfigDict, num_devices: int | None = None, num_processes: int = 1
) -> tuple[Preset, ModelConfig, dict[str, int] | None, tuple[tuple[str, object], ...]]:
    """Check ``config`` against the schema, the preset, the mesh and the batch; raise ``ConfigError``.

    Returns ``(preset, model_config, mesh_sizes, rules)``.
    """
    _check_keys(config, default_config())
    preset, mcfg = model_config(config)
    o, t = config.optim, config.train
    choices = {"optim.schedule": SCHEDULES, "optim.name": ("adam", "adamw"), "train.progress": PROGRESS,
               "train.best_mode": ("min", "max")}  # fmt: skip
    for key, allowed in choices.items():
        section, name = key.split(".")
        if config[section][name] not in allowed:
            raise ConfigError(f"{key}={config[section][name]!r}: choose from {allowed}")
    if o.name == "adam" and o.weight_decay:
        raise ConfigError(f"optim.weight_decay={o.weight_decay}: needs optim.name='adamw'")
    _check_optimizer_numbers(o, t, config.get("distill") or default_config().distill)  # older workdirs lack it
    if o.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps}: must be >= 0")
    if o.schedule == "noam" and o.warmup_steps < 1:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps}: the noam schedule needs >= 1")
    if not 0.0 <= t.label_smoothing < 1.0:
        raise ConfigError(f"train.label_smoothing={t.label_smoothing}: must be in [0, 1)")
    for key in ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "grad_accum_steps"):
        if t[key] < 1:
            raise ConfigError(f"train.{key}={t[key]}: must be >= 1")
    if t.eval_every < 0:
        raise ConfigError(f"train.eval_every={t.eval_every}: must be >= 0")
    if t.eval_steps < -1:
        raise ConfigError(f"train.eval_steps={t.eval_steps}: must be >= 0, or -1 for the whole split")

    try:
        rules = sh.make_rules(config.mesh.rules.to_dict())
    except ValueError as e:
        raise ConfigError(f"mesh.rules: {e}") from e
    mesh_request = {a: config.mesh[a] for a in sh.MESH_AXES}
    sizes = None
    if num_devices is not None:
        try:
            sizes = sh.mesh_shape(mesh_request, num_devices)
        except ValueError as e:
            raise ConfigError(f"mesh: {e}") from e
        batch_shards = math.prod(sizes[axis] for axis in sh.batch_axes(rules))
        bs = config.data.batch_size
        if bs % t.grad_accum_steps:
            raise ConfigError(f"data.batch_size={bs} is not divisible by train.grad_accum_steps={t.grad_accum_steps}")
        per_step = bs // t.grad_accum_steps
        if per_step % batch_shards:
            raise ConfigError(
                f"data.batch_size={bs} (micro-batch {per_step}) is not divisible by the {batch_shards} "
                f"batch shards of mesh axes {sh.batch_axes(rules)} = {[sizes[a] for a in sh.batch_axes(rules)]}"
            )
        if bs % num_processes:
            raise ConfigError(f"data.batch_size={bs} is not divisible by the {num_processes} processes")
    return preset, mcfg, sizes, rules


def to_json(config: ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


__all__ = ["ConfigError", "apply_overrides", "default_config", "load_config", "ml_collections", "model_config",
           "to_json", "validate"]  # fmt: skip
