"""``python -m tfm.summary PRESET`` or ``--config RECIPE.py[:arg] [--config.KEY=VALUE ...]``: a per-module parameter table.

With ``--config`` the model is the recipe's, overrides included, with the
vocabulary (or classes) its dataset fills in, exactly as ``tfm.train`` builds it.
The table ends with ``total_params: N``.

Shapes come from ``jax.eval_shape``, so even full-size presets cost no memory.
"""

from __future__ import annotations

import collections
import sys
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax

from tfm.models import PRESETS, get_preset
from tfm.models.common import active_params

if TYPE_CHECKING:
    from tfm.models.common import ModelConfig


def module_table(params: Any, depth: int = 2) -> list[tuple[str, int]]:
    """Parameter counts grouped by the first ``depth`` levels of the module path, in tree order."""
    counts: dict[str, int] = collections.OrderedDict()
    for path, leaf in jax.tree_util.tree_leaves_with_path(nn.unbox(params)):
        keys = [str(getattr(k, "key", k)) for k in path]
        module = "/".join(keys[: min(depth, len(keys) - 1)]) or keys[0]
        counts[module] = counts.get(module, 0) + int(leaf.size)
    return list(counts.items())


def summary(name: str, depth: int = 2, config: ModelConfig | None = None) -> str:
    """The table for preset ``name``, or for ``config`` (a model config of that preset's family) when given."""
    preset = get_preset(name)
    model = preset.model_cls(config) if config is not None else preset.model()
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), *preset.example_inputs(model.config)))["params"]
    rows = module_table(params, depth)
    total = sum(n for _, n in rows)
    width = max(len("module"), *(len(m) for m, _ in rows))
    lines = [f"{preset.model_cls.__name__} ({name})", f"{'module':<{width}}  {'params':>14}  {'share':>6}"]
    lines += [f"{m:<{width}}  {n:>14,}  {100 * n / total:>5.1f}%" for m, n in rows]
    lines.append(f"total_params: {total}")
    if model.config.block.num_experts:
        lines.append(f"active_params_per_token: {active_params(params, model.config)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from tfm.cli import Parser

    parser = Parser(prog="python -m tfm.summary", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--config", help="a recipe, configs/<recipe>.py[:arg], instead of a preset")
    parser.add_argument("--depth", type=int, default=2, help="module path depth to group by (default 2)")
    parser.usage = "python -m tfm.summary (PRESET | --config RECIPE [--config.KEY=VALUE ...]) [--depth N]"
    args, rest = parser.parse_known_args(argv)
    if args.config is None:
        if len(rest) != 1 or rest[0].startswith("--"):
            parser.error(f"give one preset ({', '.join(sorted(PRESETS))}) or --config RECIPE")
        args.preset = rest[0]
        if args.preset not in PRESETS:
            parser.error(f"unknown preset {args.preset!r}; choose from {', '.join(sorted(PRESETS))}")
        print(summary(args.preset, args.depth))
        return 0
    from tfm import config as config_lib
    from tfm.cli import split_overrides, stdout_to_stderr

    try:
        with stdout_to_stderr():
            config = config_lib.apply_overrides(config_lib.load_config(args.config), split_overrides(rest, parser.error))
            config = with_data(config)
            preset, model_config = config_lib.model_config(config)
    except config_lib.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(summary(preset.name, args.depth, model_config))
    return 0


def with_data(config):
    """The recipe with what its dataset fills in (the vocabulary, the classes), as the trainer does."""
    from tfm import config as config_lib
    from tfm import data as data_lib
    from tfm.trainer import fill_from_data

    preset, _ = config_lib.model_config(config)
    try:
        dataset = data_lib.make_dataset(config.data.to_dict())
    except data_lib.DataError as e:
        raise config_lib.ConfigError(str(e)) from e
    return fill_from_data(config, preset, dataset)


if __name__ == "__main__":
    sys.exit(main())
