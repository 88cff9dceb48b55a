"""The trainer in-process: sharding equivalence, FSDP memory, gradient accumulation, checkpoints, NaN stop."""

import glob
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfm import config as config_lib
from tfm import diagnosis
from tfm.checkpoint import Checkpointer
from tfm.trainer import Trainer, TrainingError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def copy_config(*overrides, variant="tiny"):
    c = config_lib.load_config(os.path.join(ROOT, "configs", f"copy.py:{variant}"))
    base = ["train.progress=none", "train.tensorboard=false", "train.async_checkpoint=true", "optim.warmup_steps=1"]
    return config_lib.apply_overrides(c, base + list(overrides))


def run_steps(trainer, n):
    state = trainer.init_state()
    it = trainer.dataset.iterator("train")
    losses = []
    for _ in range(n):
        state, m = trainer.train_step(state, next(it))
        losses.append(float(m["loss"]))
    return state, losses


def per_device_param_bytes(params, device):
    total = 0
    for x in jax.tree.leaves(params):
        total += sum(s.data.nbytes for s in x.addressable_shards if s.device == device)
    return total


LAYOUTS = {
    "1 device": (dict(data=1), 1),
    "DP=8": (dict(data=8), 8),
    "FSDP=8": (dict(data=1, fsdp=8), 8),
    "DP=2 x TP=4": (dict(data=2, tensor=4), 8),
    "FSDP=4 x TP=2": (dict(data=1, fsdp=4, tensor=2), 8),
}


@pytest.mark.slow  # in CI's second command (-m slow): it keeps the default suite near ten minutes
def test_loss_after_five_steps_is_the_same_on_every_mesh():
    """A tiny encoder-decoder, float32: 5 steps on 5 meshes of the 8 fake devices give the same loss."""
    results = {}
    for name, (axes, n) in LAYOUTS.items():
        overrides = [f"mesh.{a}={s}" for a, s in {"data": 1, "fsdp": 1, "tensor": 1, **axes}.items()]
        trainer = Trainer(copy_config(*overrides), devices=jax.devices()[:n])
        state, losses = run_steps(trainer, 5)
        results[name] = losses
        if name == "FSDP=4 x TP=2":  # parameters really are split: not one device holds a whole kernel
            kernel = state.params["encoder"]["layers"]["mlp"]["wi"]["kernel"]
            assert kernel.sharding.shard_shape(kernel.shape) != kernel.shape
    ref = np.array(results["1 device"])
    assert ref[-1] < ref[0], "the loss must fall over 5 steps for the comparison to mean anything"
    for name, losses in results.items():
        np.testing.assert_allclose(losses, ref, rtol=1e-5, atol=0, err_msg=name)


@pytest.mark.slow  # in CI's second command (-m slow): it keeps the default suite near ten minutes
def test_fsdp_parameter_bytes_per_device_fall_as_one_over_n():
    """Per-device bytes, measured from the arrays' shards, are sharded/N + replicated exactly."""
    sizes, replicated = {}, {}
    for n in (1, 2, 4, 8):
        trainer = Trainer(
            copy_config("mesh.data=1", f"mesh.fsdp={n}", "model.vocab_size=64"), devices=jax.devices()[:n]
        )
        state = trainer.init_state()
        sizes[n] = per_device_param_bytes(state.params, jax.devices()[0])
        # Norm scales and biases carry no "embed" axis, so FSDP leaves them whole.
        replicated[n] = sum(x.nbytes for x in jax.tree.leaves(state.params) if "fsdp" not in str(x.sharding.spec))
    total = sizes[1]
    assert replicated[8] == replicated[2] and replicated[8] < 0.05 * total
    for n in (2, 4, 8):
        assert sizes[n] == (total - replicated[n]) / n + replicated[n], (n, sizes)


@pytest.mark.slow  # in CI's second command (-m slow): it keeps the default suite near ten minutes
def test_gradient_accumulation_equals_the_full_batch():
    # eps=1 makes Adam's update nearly linear in the gradient; with the paper's 1e-9, entries
    # whose gradient is float noise (~1e-9) get lr-sized updates in either run and the
    # comparison would measure that noise, not the accumulation.
    common = ("mesh.data=1", "optim.eps=1.0", "optim.learning_rate=1.0")
    a = Trainer(copy_config(*common), devices=jax.devices()[:1])
    b = Trainer(copy_config(*common, "train.grad_accum_steps=4"), devices=jax.devices()[:1])
    sa, la = run_steps(a, 2)
    sb, lb = run_steps(b, 2)
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    moved = 0
    for x0, x, y in zip(jax.tree.leaves(a.init_state().params), jax.tree.leaves(sa.params), jax.tree.leaves(sb.params)):
        x0, x, y = np.asarray(x0), np.asarray(x), np.asarray(y)
        np.testing.assert_allclose(y - x0, x - x0, rtol=1e-4, atol=1e-7)  # atol: a few ulps of |x|
        moved += np.abs(x - x0).max() > 1e-6
    assert moved > 10, "the parameters must move for the comparison to mean anything"


def test_bf16_compute_keeps_float32_parameters_and_trains():
    trainer = Trainer(copy_config("mesh.data=1", "model.dtype=bfloat16"), devices=jax.devices()[:1])
    state, losses = run_steps(trainer, 4)
    dtypes = {x.dtype for x in jax.tree.leaves(state.params)} | {
        x.dtype for x in jax.tree.leaves(state.opt_state) if x.ndim
    }
    assert dtypes == {np.dtype("float32")}
    assert losses[-1] < losses[0]


def _params(state):
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def test_train_writes_metrics_checkpoints_and_restores_on_a_smaller_mesh(tmp_path):
    workdir = str(tmp_path / "run")
    cfg = copy_config("mesh.data=1", "mesh.fsdp=8", "train.steps=6", "train.checkpoint_every=2", "train.log_every=2",
                      "train.eval_every=3", "train.tensorboard=true", "train.best_metric=eval/loss")  # fmt: skip
    summary = Trainer(cfg, workdir).train()
    assert summary["step"] == 6 and summary["eval/loss"] > 0
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    logged = {k for r in rows for k in r}
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/tok_per_sec", "train/step_time_ms",
                "compile_time_s", "eval/loss", "eval/accuracy", "memory/host_peak_rss_mb"):  # fmt: skip
        assert key in logged, key
    assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["mesh"]["fsdp"] == 8 and saved["train"]["steps"] == 6
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.all_steps() == [2, 4, 6]  # keep 3 (copy:tiny) covers all; best (step 6) among them
    ckpt.close()

    # Saved on an FSDP=8 mesh, restored on 4 devices and on 1.
    ref = None
    for n in (8, 4, 1):
        c = copy_config("mesh.data=-1", "mesh.fsdp=1")
        t = Trainer(c, devices=jax.devices()[:n])
        ck = Checkpointer(os.path.join(workdir, "checkpoints"))
        step, state, data_state = ck.restore(t.abstract_state)
        ck.close()
        assert step == 6 and data_state == {"index": 6}
        assert {len(x.sharding.device_set) for x in jax.tree.leaves(state.params)} == {n}
        ref = ref or _params(state)
        for x, y in zip(ref, _params(state)):
            np.testing.assert_array_equal(x, y)

    # Inference restores the parameters alone (no optimizer state): equal to the trained ones,
    # on one device or sharded over a mesh, and in bfloat16 when asked.
    from tfm import inference
    from tfm import sharding as sh

    run = inference.load(workdir)
    assert jax.tree.structure(run.params) == jax.tree.structure(state.params)
    for x, y in zip(ref, jax.tree.leaves(run.params)):
        np.testing.assert_array_equal(x, np.asarray(y))
    sharded = inference.load(workdir, mesh=sh.make_mesh({"data": 1, "fsdp": 8, "tensor": 1, "expert": 1}))
    assert not all(x.sharding.is_fully_replicated for x in jax.tree.leaves(sharded.params))
    assert {len(x.sharding.device_set) for x in jax.tree.leaves(sharded.params)} == {8}
    for x, y in zip(ref, jax.tree.leaves(sharded.params)):
        np.testing.assert_array_equal(x, np.asarray(y))
    one, eight = run.evaluate(2)["eval/loss"], sharded.evaluate(2)["eval/loss"]
    assert abs(one - eight) < 1e-5 * max(1.0, one), (one, eight)
    half = inference.load(workdir, dtype=jnp.bfloat16)
    for x, y in zip(ref, jax.tree.leaves(half.params)):
        assert y.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(jnp.asarray(x, jnp.bfloat16)), np.asarray(y))


def _truncate_largest_file(step_dir):
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True) if os.path.isfile(f)]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 3)


def test_corrupt_latest_checkpoint_falls_back_and_keeps_everything(tmp_path, caplog):
    workdir = str(tmp_path / "run")
    base = ["mesh.data=1", "train.checkpoint_every=2", "train.eval_steps=0"]
    Trainer(copy_config(*base, "train.steps=6"), workdir, devices=jax.devices()[:1]).train()
    ckdir = os.path.join(workdir, "checkpoints")
    _truncate_largest_file(os.path.join(ckdir, "6"))
    with caplog.at_level(logging.WARNING, logger="tfm"):
        summary = Trainer(copy_config(*base, "train.steps=8"), workdir, devices=jax.devices()[:1]).train()
    assert summary["start_step"] == 4 and summary["step"] == 8
    assert "checkpoint at step 6 cannot be restored" in caplog.text
    assert sorted(int(d) for d in os.listdir(ckdir) if d.isdigit()) == [4, 6, 8]  # keep=3; the new 6 is good
    aside = os.listdir(os.path.join(workdir, "corrupt"))
    assert len(aside) == 1 and aside[0].startswith("6-")


def test_no_restorable_checkpoint_is_an_error_and_moves_nothing(tmp_path):
    workdir = str(tmp_path / "run")
    base = ["mesh.data=1", "train.checkpoint_every=2", "train.eval_steps=0", "train.steps=2"]
    Trainer(copy_config(*base), workdir, devices=jax.devices()[:1]).train()
    _truncate_largest_file(os.path.join(workdir, "checkpoints", "2"))
    with pytest.raises(RuntimeError, match=r"none of the checkpoints \[2\]"):
        Trainer(copy_config(*base, "train.steps=4"), workdir, devices=jax.devices()[:1]).train()
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
    assert not os.path.exists(os.path.join(workdir, "corrupt"))


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path / "run")
    cfg = copy_config("mesh.data=1", "train.steps=10", "train.checkpoint_every=2", "train.eval_steps=0")
    trainer = Trainer(cfg, workdir, devices=jax.devices()[:1])
    clean = trainer.dataset.batch

    def poisoned(split, index, batch_size=None):
        batch = clean(split, index, batch_size)
        if split == "train" and index == 4:  # the 5th batch
            batch["weights"] = batch["weights"] * np.float32("nan")
        return batch

    trainer.dataset.batch = poisoned
    with pytest.raises(TrainingError, match=r"step 5: train/loss is nan"):
        trainer.train()
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.all_steps() == [2, 4]
    _, state, _ = ckpt.restore(Trainer(cfg, devices=jax.devices()[:1]).abstract_state)
    ckpt.close()
    assert all(np.isfinite(x).all() for x in _params(state))


@pytest.mark.slow  # in CI's second command (-m slow): it keeps the default suite near ten minutes
def test_a_different_model_in_the_same_workdir_needs_the_flag(tmp_path):
    workdir = str(tmp_path / "run")
    base = ["mesh.data=1", "train.steps=2", "train.eval_steps=0"]
    Trainer(copy_config(*base), workdir, devices=jax.devices()[:1]).train()
    with pytest.raises(config_lib.ConfigError, match=r"model.d_model: 32 there, 48 now"):
        Trainer(copy_config(*base, "model.d_model=48"), workdir, devices=jax.devices()[:1])
    # Changing the training length (not the model) resumes.
    s = Trainer(
        copy_config(*base[:1], "train.steps=3", "train.eval_steps=0"), workdir, devices=jax.devices()[:1]
    ).train()
    assert s["start_step"] == 2 and s["step"] == 3
    # With the flag, the other model's checkpoints are moved aside, not mixed in or deleted.
    s = Trainer(
        copy_config(*base, "model.d_model=48"), workdir, devices=jax.devices()[:1], allow_model_change=True
    ).train()
    assert s["start_step"] == 0
    assert glob.glob(os.path.join(workdir, "replaced-*", "checkpoints", "3"))


def test_checkpointer_keeps_the_latest_k_and_the_best(tmp_path):
    ck = Checkpointer(str(tmp_path / "ck"), keep=2, best_metric="eval/loss", best_mode="min", async_save=False)
    losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5, 5: 2.7}
    for step, loss in losses.items():
        ck.save(step, {"w": np.full((3,), step, np.float32)}, {"index": step}, metrics={"eval/loss": loss})
    ck.wait()
    assert ck.all_steps() == [2, 4, 5]  # the best (step 2) and the latest two
    abstract = {
        "w": jax.ShapeDtypeStruct((3,), np.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    }
    step, state, data = ck.restore(abstract)
    assert step == 5 and data == {"index": 5} and np.all(np.asarray(state["w"]) == 5)
    assert ck.save(5, {"w": np.zeros(3, np.float32)}, {"index": 0}) is False  # never over an existing step
    ck.close()


def test_aux_losses_sown_by_scanned_layers_are_summed():
    """Layers (e.g. MoE) report auxiliary losses by sowing into "aux_loss"; scan keeps one per layer."""
    import flax.linen as nn
    import jax.numpy as jnp

    from tfm.layers.blocks import BlockConfig, Stack
    from tfm.step import _aux_loss

    class SowingBlock(nn.Module):
        config: BlockConfig

        @nn.compact
        def __call__(self, x, deterministic):
            x = nn.Dense(x.shape[-1])(x)
            self.sow("aux_loss", "penalty", jnp.mean(x**2))
            return x

    cfg = BlockConfig(d_model=4, num_heads=1, d_ff=4, norm_position="post")
    x = jnp.ones((2, 3, 4))
    for scan in (True, False):
        stack = Stack(SowingBlock, cfg, 3, scan=scan)
        params = stack.init(jax.random.key(0), x)["params"]
        _, mutated = stack.apply({"params": params}, x, mutable=["aux_loss"])
        # The same three penalties recomputed layer by layer.
        expected, h = 0.0, x
        layer_params = [jax.tree.map(lambda p: p[i], params["layers"]) if scan else params[f"layers_{i}"] for i in range(3)]
        for p in layer_params:
            h = nn.Dense(4).apply({"params": nn.unbox(p)["Dense_0"]}, h)
            expected += float(jnp.mean(h**2))
        assert abs(float(_aux_loss(mutated)) - expected) < 1e-5 * expected, scan


def test_the_start_up_banner_names_devices_mesh_parameters_and_cost():
    from tfm.models import count_params

    trainer = Trainer(copy_config("mesh.data=2", "mesh.tensor=2"), devices=jax.devices()[:4])
    line = diagnosis.banner(trainer)
    total = count_params(trainer.abstract_state.params)
    assert line.startswith("4 device(s) (4 cpu), 1 process(es); mesh data 2 x fsdp 1 x tensor 2 x expert 1;")
    assert f"Transformer (transformer_tiny) with {total:,} parameters;" in line
    flops, units = trainer.flops_and_units(trainer.dataset.batch("train", 0))
    assert line.endswith(f"; {units:,.0f} tok and {flops / 1e9:,.2f} GFLOP per step")
    assert "active" not in line
    moe = diagnosis.banner(Trainer(copy_config("model.preset=transformer_moe_tiny"), devices=jax.devices()[:1]))
    assert "active per token" in moe


def test_dry_run_reports_the_compiled_steps_memory_and_writes_nothing(tmp_path, capsys):
    from tfm import train

    workdir = tmp_path / "run"
    argv = ["--config", os.path.join(ROOT, "configs", "copy.py:tiny"), "--workdir", str(workdir), "--dry_run",
            "--config.train.progress=none", "--config.mesh.data=-1"]  # fmt: skip
    assert train.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"dry run: {len(jax.devices())} device(s)") and out[1].startswith("per device: peak ")
    assert not workdir.exists()
    trainer = Trainer(copy_config("mesh.data=2"), devices=jax.devices()[:2])
    report = diagnosis.memory_report(trainer)
    params = trainer.abstract_state.params
    replicated = sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(params))
    assert report["state"] >= 3 * replicated  # parameters + Adam's two moments, replicated over data
    batch = sum(v.nbytes for v in trainer.dataset.batch("train", 0).values()) // 2  # half the rows per device
    assert abs(report["argument"] - (report["state"] + batch)) <= 0.1 * report["argument"]
    assert report["alias"] >= 0.9 * report["state"]  # the state is donated
    assert report["peak"] >= report["argument"] and report["temp"] > 0


@pytest.mark.slow  # in CI's second command (-m slow): it keeps the default suite near ten minutes
def test_dry_run_for_a_larger_mesh_than_the_machine_has(tmp_path, capsys):
    """--dry_run_devices 4 with FSDP over all four: each device holds about a quarter of the state."""
    from tfm import train

    workdir = tmp_path / "run"
    argv = ["--config", os.path.join(ROOT, "configs", "copy.py:tiny"), "--workdir", str(workdir), "--dry_run",
            "--dry_run_devices", "4", "--config.train.progress=none", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
            "--config.model.d_model=256", "--config.model.d_ff=1024"]  # fmt: skip (a few MiB of state)
    assert train.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("compiled for 4 CPU devices") and out[1].startswith("dry run: 4 device(s)")
    assert "mesh data 1 x fsdp 4" in out[1] and not workdir.exists()
    state_4 = float(out[2].split("the training state is ")[1].split(" MiB")[0])
    one = Trainer(copy_config("mesh.data=1", "model.d_model=256", "model.d_ff=1024"), devices=jax.devices()[:1])
    assert state_4 * 2**20 == pytest.approx(diagnosis.memory_report(one)["state"] / 4, rel=0.05)
    here = [a for a in argv if a not in ("--dry_run_devices", "4")]
    assert train.main([*here, "--dry_run_devices=0"]) == 0  # 0: this machine's devices, no subprocess
    assert capsys.readouterr().out.startswith("dry run: ")
    assert train.main([*here, "--dry_run_devices=-2"]) == 2
    assert "--dry_run_devices=-2: must be at least 1" in capsys.readouterr().err


def test_out_of_memory_is_one_line_naming_the_knobs(tmp_path, capsys, monkeypatch):
    """A RESOURCE_EXHAUSTED from XLA (simulated) becomes one line with this run's values, exit 1."""
    from tfm import train

    def exhausted(self):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81.00GiB.\\nmore")

    monkeypatch.setattr(Trainer, "train", exhausted)
    argv = ["--config", os.path.join(ROOT, "configs", "copy.py:tiny"), "--workdir", str(tmp_path / "run"),
            "--config.train.progress=none", "--config.train.grad_accum_steps=2"]  # fmt: skip
    assert train.main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    err = [line for line in lines if not line.startswith(("INFO ", "WARNING "))]  # the log, not the error
    assert len(err) == 1 and err[0].startswith("out of memory: RESOURCE_EXHAUSTED: Out of memory while trying")
    for knob in ("model.remat_policy=full", "train.grad_accum_steps=4 (now 2)", "mesh.fsdp=-1",
                 "model.dtype=bfloat16", "data.batch_size (now 32)", "--dry_run"):  # fmt: skip
        assert knob in err[0]


def test_profile_steps_write_a_trace_tensorboard_and_perfetto_open(tmp_path):
    workdir = tmp_path / "run"
    Trainer(copy_config("train.steps=4", "train.profile_steps=1:3"), str(workdir), devices=jax.devices()[:1]).train()
    traces = glob.glob(str(workdir / "profile" / "plugins" / "profile" / "*" / "*"))
    assert any(t.endswith(".xplane.pb") for t in traces), traces
    assert any(t.endswith("perfetto_trace.json.gz") for t in traces), traces


class _FakeWandb:
    """Records what the trainer asks of the wandb package (the real one needs an account or a service)."""

    def __init__(self):
        self.inits, self.logged, self.finished = [], [], 0
        self.util = type("util", (), {"generate_id": staticmethod(lambda: f"run{len(self.inits)}")})

    def init(self, **kw):
        self.inits.append(kw)
        return self

    def log(self, scalars, step):
        self.logged.append((step, dict(scalars)))

    def finish(self):
        self.finished += 1


def test_wandb_logging_goes_on_in_the_same_run_after_a_resume(tmp_path, monkeypatch):
    import sys

    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    workdir = tmp_path / "run"
    args = ["train.wandb_project=tfm-tests", "train.log_every=1", "train.eval_steps=0", "train.checkpoint_every=2"]
    Trainer(copy_config("train.steps=2", *args), str(workdir), devices=jax.devices()[:1]).train()
    Trainer(copy_config("train.steps=4", *args), str(workdir), devices=jax.devices()[:1]).train()
    assert [i["id"] for i in fake.inits] == ["run0", "run0"] and (workdir / "wandb_run_id").read_text() == "run0"
    assert fake.inits[0]["project"] == "tfm-tests" and fake.inits[0]["resume"] == "allow" and fake.inits[0]["name"] == "run"
    assert fake.inits[0]["config"]["train"]["steps"] == 2 and fake.inits[1]["config"]["train"]["steps"] == 4
    steps = [s for s, m in fake.logged if "train/loss" in m]
    assert steps == [1, 2, 3, 4] and fake.finished == 2
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["train/loss"] for r in rows if "train/loss" in r] == [m["train/loss"] for _, m in fake.logged if "train/loss" in m]


def test_wandb_project_without_the_package_is_one_clear_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    message = r"train.wandb_project='p' needs the wandb package \(pip install wandb\)"
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(copy_config("train.wandb_project=p"))  # what the CLI checks before it starts
    with pytest.raises(ValueError, match=message):
        Trainer(copy_config("train.steps=1", "train.wandb_project=p"), str(tmp_path), devices=jax.devices()[:1]).train()
