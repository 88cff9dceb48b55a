"""``python -m tfm.summary PRESET``: a per-module parameter table and ``total_params: N``.

Shapes come from ``jax.eval_shape``, so even full-size presets cost no memory.
"""

from __future__ import annotations

import argparse
import collections
import sys
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax

from tfm.models import PRESETS, get_preset

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


EXPERT_WEIGHTS = ("wi", "wi_0", "wi_1", "wo", "wi_bias", "wi_0_bias", "wi_1_bias", "wo_bias")


def active_params(params: Any, config: ModelConfig) -> int:
    """Parameters one token uses: everything but the experts, plus k of the E experts of each MoE layer."""
    experts = config.block.num_experts
    total = expert = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(nn.unbox(params)):
        keys = [str(getattr(k, "key", k)) for k in path]
        total += int(leaf.size)
        if "moe" in keys and keys[-1] in EXPERT_WEIGHTS:
            expert += int(leaf.size)
    if not experts:
        return total
    return total - expert + expert * config.block.experts_per_token // experts


def summary(name: str, depth: int = 2) -> str:
    preset = get_preset(name)
    params = preset.init_shapes()["params"]
    rows = module_table(params, depth)
    total = sum(n for _, n in rows)
    width = max(len("module"), *(len(m) for m, _ in rows))
    lines = [f"{preset.model_cls.__name__} ({name})", f"{'module':<{width}}  {'params':>14}  {'share':>6}"]
    lines += [f"{m:<{width}}  {n:>14,}  {100 * n / total:>5.1f}%" for m, n in rows]
    lines.append(f"total_params: {total}")
    if preset.config.block.num_experts:
        lines.append(f"active_params_per_token: {active_params(params, preset.config)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tfm.summary", description=__doc__.splitlines()[0])
    parser.add_argument("preset", help=f"one of: {', '.join(sorted(PRESETS))}")
    parser.add_argument("--depth", type=int, default=2, help="module path depth to group by (default 2)")
    args = parser.parse_args(argv)
    if args.preset not in PRESETS:
        parser.error(f"unknown preset {args.preset!r}; choose from {', '.join(sorted(PRESETS))}")
    print(summary(args.preset, args.depth))
    return 0


if __name__ == "__main__":
    sys.exit(main())
