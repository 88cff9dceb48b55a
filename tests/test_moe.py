"""Mixture-of-Experts: the routed layer against a per-token loop, losses, capacity, dropless, experts on a mesh."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _helpers import maxerr, randn
from tfm import config as config_lib
from tfm.layers.moe import MoE, capacity, capacity_dispatch, load_balance_loss
from tfm.models import get_preset
from tfm.trainer import Trainer

pytestmark = pytest.mark.usefixtures("cheap_xla_compiles")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
E, D, F = 4, 16, 24


def _unbox(variables):
    return jax.tree.map(np.asarray, nn.unbox(variables["params"]))


def _ffn(p, e, x, activation, bias):
    """The dense FFN of expert ``e`` on one token, in float64."""
    if activation == "swiglu":
        a = x @ p["wi_0"][e]
        h = a / (1 + np.exp(-a)) * (x @ p["wi_1"][e])
    else:
        h = np.maximum(x @ p["wi"][e] + (p["wi_bias"][e] if bias else 0), 0)
    return h @ p["wo"][e] + (p["wo_bias"][e] if bias else 0)


def naive_moe(p, x, top_k, activation="relu", bias=False, renormalize=True):
    """The textbook algorithm: for each token, softmax router, its top-k experts, weighted sum of their FFNs."""
    x = np.asarray(x, np.float64)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    out = np.zeros_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            logits = x[b, t] @ p["router"]
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            top = np.argsort(-probs, kind="stable")[:top_k]
            gates = probs[top] / probs[top].sum() if renormalize else probs[top]
            for e, g in zip(top, gates):
                out[b, t] += g * _ffn(p, e, x[b, t], activation, bias)
    return out


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
@pytest.mark.parametrize(
    "top_k,activation,bias,renormalize",
    [(1, "relu", True, False), (2, "relu", False, True), (2, "swiglu", False, True), (3, "relu", True, True)],
)
def test_unlimited_capacity_equals_the_per_token_loop(dispatch, top_k, activation, bias, renormalize):
    x = randn(np.random.default_rng(0), 2, 7, D)
    # capacity_factor E / k gives C = group size: no token can be dropped.
    moe = MoE(E, F, top_k=top_k, activation=activation, use_bias=bias, dispatch=dispatch,
              capacity_factor=E / top_k, renormalize=renormalize)  # fmt: skip
    variables = moe.init(jax.random.key(1), x)
    params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), nn.unbox(variables["params"]))
    y, stats = moe.apply({"params": params}, x, mutable=["aux_loss", "moe_stats"])
    ref = naive_moe(jax.tree.map(np.asarray, params), x, top_k, activation, bias, renormalize)
    assert maxerr(y, ref) < 1e-5
    assert float(stats["moe_stats"]["drop_fraction"][0]) == 0.0
    np.testing.assert_allclose(float(np.sum(stats["moe_stats"]["load"][0])), 1.0, rtol=1e-6)


def test_dropless_equals_capacity_with_unlimited_capacity_in_value_and_gradient():
    x = randn(np.random.default_rng(1), 3, 8, D)
    kwargs = dict(top_k=2, activation="swiglu")
    cap = MoE(E, F, dispatch="capacity", capacity_factor=E / 2, **kwargs)
    drop = MoE(E, F, dispatch="dropless", **kwargs)
    params = nn.unbox(cap.init(jax.random.key(0), x)["params"])

    def loss(module, p, x):
        y, aux = module.apply({"params": p}, x, mutable=["aux_loss"])
        return jnp.sum(y * jnp.cos(jnp.arange(D))) + sum(jnp.sum(a) for a in jax.tree.leaves(aux))

    for argnums in (1, 2):  # parameters (router included) and inputs
        g_cap = jax.grad(loss, argnums)(cap, params, x)
        g_drop = jax.grad(loss, argnums)(drop, params, x)
        for a, b in zip(jax.tree.leaves(g_cap), jax.tree.leaves(g_drop)):
            assert maxerr(a, b) < 1e-5
    assert maxerr(cap.apply({"params": params}, x, mutable=["aux_loss"])[0],
                  drop.apply({"params": params}, x, mutable=["aux_loss"])[0]) < 1e-5  # fmt: skip


def test_the_router_gets_gradients():
    x = randn(np.random.default_rng(2), 2, 6, D)
    moe = MoE(E, F, top_k=2)
    params = nn.unbox(moe.init(jax.random.key(0), x)["params"])
    # Only the task loss (no auxiliary loss): the router learns through the combine weights.
    grads = jax.grad(lambda p: jnp.sum(moe.apply({"params": p}, x, mutable=["aux_loss"])[0] ** 2))(params)
    assert float(jnp.abs(grads["router"]).max()) > 1e-4
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_a_uniform_router_gives_load_balancing_loss_exactly_one():
    x = randn(np.random.default_rng(3), 2, 5, D)
    moe = MoE(E, F, top_k=2, load_balance_weight=1.0, router_z_weight=0.0)
    params = nn.unbox(moe.init(jax.random.key(0), x)["params"])
    params["router"] = jnp.zeros_like(params["router"])  # every expert equally likely
    _, aux = moe.apply({"params": params}, x, mutable=["aux_loss"])
    assert float(aux["aux_loss"]["load_balance"][0]) == pytest.approx(1.0, abs=1e-6)
    assert float(aux["aux_loss"]["router_z"][0]) == 0.0
    # And the function itself: balanced assignments and probabilities give 1; all on one expert gives E.
    probs = jnp.full((8, E), 1 / E)
    assert float(load_balance_loss(probs, jnp.arange(8)[:, None] % E)) == pytest.approx(1.0)
    skewed = jax.nn.one_hot(jnp.zeros(8, int), E)
    assert float(load_balance_loss(skewed, jnp.zeros((8, 1), int))) == pytest.approx(E)


def test_router_z_loss_is_the_mean_squared_logsumexp():
    x = randn(np.random.default_rng(4), 1, 3, D)
    moe = MoE(E, F, top_k=1, load_balance_weight=0.0, router_z_weight=1.0)
    params = nn.unbox(moe.init(jax.random.key(0), x)["params"])
    _, aux = moe.apply({"params": params}, x, mutable=["aux_loss"])
    logits = np.asarray(x, np.float64) @ np.asarray(params["router"], np.float64)
    expected = np.mean(np.log(np.exp(logits).sum(-1)) ** 2)
    assert float(aux["aux_loss"]["router_z"][0]) == pytest.approx(expected, rel=1e-5)


def test_capacity_fills_first_choices_first_in_token_order():
    # 4 tokens, 2 experts, top-2, capacity 2. Priority: first choices t0->e0, t1->e1, t2->e0, t3->e0 (full),
    # then second choices t0->e1, t1->e0 (full), t2->e1 (full), t3->e1 (full).
    experts = jnp.array([[[0, 1], [1, 0], [0, 1], [0, 1]]])
    gates = jnp.array([[[0.6, 0.4], [0.7, 0.3], [0.8, 0.2], [0.9, 0.1]]])
    dispatch, combine = capacity_dispatch(experts, gates, 2, 2)
    slots = {(e, c): [t for t in range(4) if dispatch[0, t, e, c]] for e in range(2) for c in range(2)}
    assert slots == {(0, 0): [0], (0, 1): [2], (1, 0): [1], (1, 1): [0]}
    np.testing.assert_allclose(combine[0].sum((1, 2)), [1.0, 0.7, 0.8, 0.0])


def test_tokens_beyond_capacity_are_dropped_in_order_and_pass_through_as_zero():
    s, cap_factor = 10, 1.0  # top-1 over 4 experts: capacity ceil(1.0 * 10 / 4) = 3
    x = jnp.abs(randn(np.random.default_rng(5), 1, s, D)) + 0.1
    moe = MoE(E, F, top_k=1, capacity_factor=cap_factor, renormalize=False)
    params = nn.unbox(moe.init(jax.random.key(0), x)["params"])
    router = np.zeros((D, E), np.float32)
    router[:, 2] = 1.0  # every token (positive features) prefers expert 2
    params["router"] = jnp.asarray(router)
    y, stats = moe.apply({"params": params}, x, mutable=["aux_loss", "moe_stats"])
    c = capacity(s, E, 1, cap_factor)
    assert c == 3
    ref = naive_moe(jax.tree.map(np.asarray, params), x, 1, renormalize=False)
    assert maxerr(y[0, :c], ref[0, :c]) < 1e-5  # the first C tokens are served
    assert float(jnp.abs(y[0, c:]).max()) == 0.0  # the rest are dropped: only the block's residual remains
    assert float(stats["moe_stats"]["drop_fraction"][0]) == pytest.approx((s - c) / s)
    np.testing.assert_allclose(stats["moe_stats"]["load"][0], [0, 0, 1, 0])


def test_bad_moe_settings_are_refused():
    x = jnp.zeros((1, 4, D))
    for kwargs, text in [
        (dict(top_k=5), "top_k"),
        (dict(dispatch="ragged"), "dispatch"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(group_size=3), "group_size"),
    ]:
        with pytest.raises(ValueError, match=text):
            MoE(E, F, **kwargs).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="moe_every"):
        get_preset("gpt_moe_tiny").model(moe_every=3).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))


def test_moe_every_k_places_experts_in_every_kth_layer_scanned_and_unscanned():
    tokens = jnp.ones((1, 8), jnp.int32)
    preset = get_preset("gpt_moe_tiny")  # 2 layers, moe_every=2: layer 2 is MoE
    scanned = nn.unbox(preset.init_shapes()["params"])["decoder"]["layers"]
    assert set(scanned) == {"block_0", "block_1"} and "mlp" in scanned["block_0"] and "moe" in scanned["block_1"]
    assert scanned["block_1"]["moe"]["wi"].shape == (1, 4, 32, 64)  # [L/k, E, D, F]
    unscanned = nn.unbox(preset.init_shapes(scan_layers=False)["params"])["decoder"]
    assert "mlp" in unscanned["layers_0"] and "moe" in unscanned["layers_1"]
    # The same weights give the same logits both ways.
    model_s, model_u = preset.model(), preset.model(scan_layers=False)
    ps = nn.unbox(model_s.init(jax.random.key(0), tokens)["params"])
    pu = nn.unbox(model_u.init(jax.random.key(1), tokens)["params"])
    layers = ps["decoder"]["layers"]
    pu["decoder"]["layers_0"] = jax.tree.map(lambda a: a[0], layers["block_0"])
    pu["decoder"]["layers_1"] = jax.tree.map(lambda a: a[0], layers["block_1"])
    for name in ("embed", "pos_embed"):
        pu[name] = ps[name]
    pu["decoder"]["final_norm"] = ps["decoder"]["final_norm"]
    out_s = model_s.apply({"params": ps}, tokens, mutable=["aux_loss"])[0]
    out_u = model_u.apply({"params": pu}, tokens, mutable=["aux_loss"])[0]
    assert maxerr(out_s, out_u) < 1e-5


def test_mixtral_preset_has_the_published_parameter_counts():
    from tfm.summary import active_params

    preset = get_preset("mixtral_8x7b")
    assert preset.num_params() == 46_702_792_704  # "46.7B total"
    # "12.9B active": attention, norms, router and embeddings, plus 2 of the 8 experts per layer.
    assert active_params(preset.init_shapes()["params"], preset.config) == 12_879_925_248


def _moe_config(*overrides):
    c = config_lib.default_config()
    c.model.preset = "gpt_moe_tiny"
    c.data.name = "synthetic_lm"
    with c.data.ignore_type():
        c.data.update(dict(vocab_size=64, seq_len=16))
    c.data.batch_size = 8
    c.optim.warmup_steps = 1
    c.train.progress = "none"
    c.train.tensorboard = False
    return config_lib.apply_overrides(c, list(overrides))


def test_trainer_adds_the_aux_losses_and_reports_router_statistics():
    trainer = Trainer(_moe_config("model.capacity_factor=1.0"))
    state = trainer.init_state()
    _, m = trainer.train_step(state, next(trainer.dataset.iterator("train")))
    assert float(m["aux_loss"]) > 0.0
    np.testing.assert_allclose(float(np.sum(m["moe_load"])), 1.0, rtol=1e-6)
    assert m["moe_load"].shape == (4,)
    assert 0.0 <= float(m["moe_drop_fraction"]) < 1.0


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_expert_parallel_on_8_devices_equals_one_device(dispatch):
    """Experts split over an expert axis of 4 (x data 2): the same losses as one device, and no device holds all experts."""
    results = {}
    for name, axes, n in [("1 device", dict(data=1), 1), ("EP=4 x DP=2", dict(data=2, expert=4), 8)]:
        overrides = [f"mesh.{a}={s}" for a, s in {"data": 1, "expert": 1, **axes}.items()]
        trainer = Trainer(_moe_config(f"model.moe_dispatch={dispatch}", *overrides), devices=jax.devices()[:n])
        state = trainer.init_state()
        it = trainer.dataset.iterator("train")
        losses = []
        for _ in range(3):
            state, m = trainer.train_step(state, next(it))
            losses.append(float(m["loss"]))
        results[name] = losses
        if n == 8:
            wi = state.params["decoder"]["layers"]["block_1"]["moe"]["wi"]
            assert wi.sharding.shard_shape(wi.shape)[1] == 1  # [L, E=4, D, F] -> one expert per device
            batch = trainer.place(next(it))
            with trainer._context():
                hlo = trainer._train_step.lower(state, batch).compile().as_text()
            gathers = [line for line in hlo.splitlines() if " all-gather(" in line or " all-gather-start(" in line]
            # Tokens move, expert weights do not: no all-gather yields a whole [E, D, F] / [E, F, D] tensor.
            assert not [g for g in gathers if "[4,32,64]" in g or "[4,64,32]" in g or "[1,4,32,64]" in g], gathers
            if dispatch == "capacity":
                assert "all-to-all" in hlo  # the dispatch einsum became an all-to-all
    np.testing.assert_allclose(results["EP=4 x DP=2"], results["1 device"], rtol=1e-5)
