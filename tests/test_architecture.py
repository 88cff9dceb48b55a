"""The structure: no import cycles, the pure step, every task, the attention-kind registry."""

import ast
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _helpers import maxerr, randn
from tfm import tasks
from tfm.layers import attention_kinds, tuning
from tfm.layers.attention import MultiHeadAttention
from tfm.models import PRESETS, ViT
from tfm.step import TrainState, init_fn, make_eval_step, make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "tfm")


# The import graph ------------------------------------------------------------


def _modules() -> dict[str, str]:
    """Module name -> file, for every module of the package."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, f)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its body (function-level imports included)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                # ``from a import b``: the submodule a.b where it is one, else the module a.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            deps.update(t for t in targets if t in modules and t != name)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None


def test_the_package_has_no_import_cycle_lazy_imports_included():
    graph = import_graph()
    assert "tfm.layers.attention" in graph and "tfm.trainer" in graph  # the walk sees the package
    assert "tfm.layers.dot_product" in graph["tfm.layers.attention_kinds"]  # and resolves ``from x import y``
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_attention_imports_run_one_way():
    graph = import_graph()
    order = ["tfm.layers.masks", "tfm.layers.dot_product", "tfm.layers.attention_kinds", "tfm.layers.attention",
             "tfm.layers.blocks"]  # fmt: skip
    for i, lower in enumerate(order):
        for higher in order[i + 1 :]:
            assert higher not in graph[lower], f"{lower} imports {higher}"


# The pure step and the tasks --------------------------------------------------


def _batch(task_name: str, cfg, rng) -> dict:
    b = 4
    if task_name == "classify":
        images = rng.standard_normal((b, cfg.image_size, cfg.image_size, cfg.num_channels)).astype(np.float32)
        return {"inputs": images, "labels": rng.integers(0, cfg.num_classes, b).astype(np.int32)}
    tokens = rng.integers(3, cfg.vocab_size, (b, 9)).astype(np.int32)
    if task_name == "lm":
        return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    return {"inputs": tokens[:, 1:], "decoder_inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def _train(preset_name: str, steps: int):
    preset = PRESETS[preset_name]
    task = tasks.get_task(preset.task)
    model = preset.model_cls(preset.config)
    batch = {k: jnp.asarray(v) for k, v in _batch(task.name, preset.config, np.random.default_rng(0)).items()}
    schedule = optax.constant_schedule(3e-3)
    tx = optax.adam(schedule)
    state = nn.unbox(init_fn(model, task, tx, batch)(jax.random.key(0)))
    step = jax.jit(make_train_step(model, task, tx, schedule))
    evaluate = jax.jit(make_eval_step(model, task))
    before = evaluate(state.params, batch)
    losses = []
    for _ in range(steps):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    return state, losses, before, evaluate(state.params, batch)


@pytest.mark.usefixtures("cheap_xla_compiles")
@pytest.mark.parametrize("preset", ["gpt_tiny", "transformer_tiny", "t5_tiny", "vit_tiny", "gpt_moe_tiny"])
def test_the_pure_step_trains_every_task_without_a_workdir(preset):
    state, losses, before, after = _train(preset, 25)
    assert isinstance(state, TrainState) and int(state.step) == 25
    # Step 1's loss is the eval loss of the initial parameters (no dropout in the tiny presets).
    assert abs(losses[0] - float(before["loss_sum"] / before["weight_sum"])) < 1e-4
    assert float(after["loss_sum"] / after["weight_sum"]) < 0.5 * losses[0], losses  # one batch, memorised
    assert np.isfinite(losses).all()


def test_each_preset_names_a_registered_task_or_none():
    for name, preset in PRESETS.items():
        if preset.task is not None:
            assert tasks.get_task(preset.task).name == preset.task, name
    assert PRESETS["bert_tiny"].task is None
    with pytest.raises(ValueError, match="unknown task 'no_such_task'"):
        tasks.get_task("no_such_task")


def test_moe_flops_count_only_the_routed_experts():
    preset = PRESETS["gpt_moe_tiny"]
    params = preset.init_shapes()["params"]
    task = tasks.get_task("lm")
    shapes = {"inputs": (8, 16)}
    cfg = preset.config
    flops = {k: task.flops_per_step(cfg.replace(experts_per_token=k), params, shapes) for k in (1, 2, 4)}
    expert_params = sum(
        int(np.prod(leaf.shape))
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
        if "moe" in jax.tree_util.keystr(path) and "router" not in jax.tree_util.keystr(path)
    )
    tokens = 8 * 16
    # Each extra expert per token adds 6 FLOPs (forward + backward) per weight of one expert.
    assert flops[2] - flops[1] == pytest.approx(6 * tokens * expert_params / cfg.block.num_experts)
    # Routing to every expert counts every parameter, as a dense model would.
    n_all = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params["decoder"])) + cfg.vocab_size * cfg.block.d_model
    dense = 3 * (2 * n_all * tokens + 4 * cfg.num_layers * 16 * cfg.block.d_model * tokens)
    assert flops[4] == pytest.approx(dense)


@pytest.mark.usefixtures("cheap_xla_compiles")
def test_flip_evaluation_averages_the_probabilities_of_each_image_and_its_mirror():
    preset = PRESETS["vit_tiny"]
    model, task = ViT(preset.config), tasks.get_task("classify")
    rng = np.random.default_rng(0)
    batch = {k: jnp.asarray(v) for k, v in _batch("classify", preset.config, rng).items()}
    params = jax.jit(model.init)(jax.random.key(0), batch["inputs"])["params"]
    leaves, treedef = jax.tree.flatten(params)  # the head starts at zero: move every weight off its start
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(treedef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    single, flipped = (jax.jit(make_eval_step(model, task, flip=f)) for f in (False, True))
    sums = flipped(params, batch)
    apply = jax.jit(lambda x: model.apply({"params": params}, x))
    views = [apply(x) for x in (batch["inputs"], batch["inputs"][:, :, ::-1])]
    probs = np.mean([np.asarray(jax.nn.softmax(v)) for v in views], axis=0)
    labels = np.asarray(batch["labels"])
    np.testing.assert_allclose(float(sums["loss_sum"]), -np.log(probs[np.arange(4), labels]).sum(), rtol=1e-5)
    assert float(sums["correct"]) == (probs.argmax(-1) == labels).sum()
    # An image that is its own mirror gets the single view's prediction.
    symmetric = {**batch, "inputs": batch["inputs"] + batch["inputs"][:, :, ::-1]}
    one, two = single(params, symmetric), flipped(params, symmetric)
    np.testing.assert_allclose(float(one["loss_sum"]), float(two["loss_sum"]), rtol=1e-5)
    with pytest.raises(ValueError, match="needs an image classification run .* not task 'lm'"):
        make_eval_step(model, tasks.get_task("lm"), flip=True)


@pytest.mark.parametrize("stem", [(), (8, 16)])
def test_vit_flops_agree_with_xlas_count_of_the_forward_pass(stem, monkeypatch):
    # The hybrid ViT's tokens are patches of the stem's feature map, not of the image.
    cfg = PRESETS["vit_tiny"].config.replace(stem_channels=stem, patch_size=1 if stem else 7)
    model, images = ViT(cfg), jnp.zeros((4, 28, 28, 1))
    params = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    flops = tasks.get_task("classify").flops_per_step(cfg, params, {"inputs": images.shape})
    # XLA's count sees no FLOPs inside a custom call: trace through XLA's attention, not the CPU kernel.
    monkeypatch.setattr(tuning, "CPU_ATTENTION", False)
    monkeypatch.setattr(tuning, "CPU_ROWWISE", False)
    compiled = jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(params, images).compile()
    xla = compiled.cost_analysis()["flops"]
    # XLA counts the elementwise work too (norms, GELU, softmax): a few per cent more.
    assert 1.0 <= xla / (flops / 3) < 1.25, (xla, flops / 3)


@pytest.mark.usefixtures("cheap_xla_compiles")
def test_t5_refuses_packed_batches_instead_of_ignoring_them():
    preset = PRESETS["t5_tiny"]
    model = preset.model_cls(preset.config)
    src = jnp.ones((1, 8), jnp.int32)
    params = model.init(jax.random.key(0), src, src)
    with pytest.raises(ValueError, match=r"unpacked batches only; got \['src_segment_ids'\]"):
        model.apply(params, src, src, src_segment_ids=src)


# The attention-kind registry --------------------------------------------------


def test_a_kind_is_one_registry_entry_and_multi_head_attention_uses_it():
    def same_as_full(query, key, value, *, causal, kv_valid=None, scale=None):
        return attention_kinds.KINDS["full"].fn(query, key, value, causal=causal, kv_valid=kv_valid, scale=scale)

    attention_kinds.register(attention_kinds.AttentionKind("test_kind", same_as_full, cross=True))
    try:
        x = randn(np.random.default_rng(0), 2, 6, 16)
        full = MultiHeadAttention(num_heads=4, head_dim=4, kind="full")
        mine = MultiHeadAttention(num_heads=4, head_dim=4, kind="test_kind", causal=True)
        params = full.init(jax.random.key(0), x)
        from tfm.layers.masks import causal_mask

        expected = full.apply(params, x, mask=causal_mask(6)[None, None])
        assert maxerr(mine.apply(params, x), expected) < 1e-6
        # What the entry does not declare is refused by name.
        with pytest.raises(ValueError, match="'test_kind' takes no bias"):
            mine.apply(params, x, bias=jnp.zeros((1, 4, 6, 6)))
        with pytest.raises(ValueError, match="already registered"):
            attention_kinds.register(attention_kinds.AttentionKind("test_kind", same_as_full))
    finally:
        attention_kinds.KINDS.pop("test_kind", None)
    with pytest.raises(ValueError, match="unknown attention kind 'test_kind'; registered: "):
        mine.apply(params, x)
