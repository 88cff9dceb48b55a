"""Run configs: overrides, and every bad-config case gives one clear error and writes nothing."""

import os

import pytest

from tfm import cli, train
from tfm import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPY = os.path.join(ROOT, "configs", "copy.py")


def test_overrides_are_typed_and_nested():
    c = config_lib.load_config(COPY + ":tiny")
    c2 = config_lib.apply_overrides(c, ["train.steps=70", "optim.learning_rate=1", "model.norm_position=post",
                                        "train.async_checkpoint=false", "mesh.rules.mlp=None"])  # fmt: skip
    assert c2.train.steps == 70 and isinstance(c2.train.steps, int)
    assert c2.optim.learning_rate == 1.0 and isinstance(c2.optim.learning_rate, float)
    assert c2.model.norm_position == "post" and c2.train.async_checkpoint is False
    assert c2.mesh.rules.mlp is None
    assert c.train.steps == 800, "the recipe's dict must stay untouched"
    preset, mcfg, sizes, rules = config_lib.validate(c2, num_devices=8)
    assert mcfg.block.norm_position == "post" and mcfg.block.d_model == 32
    assert sizes == {"data": 8, "fsdp": 1, "tensor": 1, "expert": 1}
    assert dict(rules)["mlp"] is None


def test_dtype_strings_become_dtypes():
    import jax.numpy as jnp

    c = config_lib.apply_overrides(config_lib.load_config(COPY), ["model.dtype=bfloat16"])
    _, mcfg = config_lib.model_config(c)
    assert mcfg.block.dtype == jnp.bfloat16 and mcfg.block.param_dtype == jnp.float32


BAD = [
    (["--config.train.stepz=3"], "train.stepz"),
    (["--config.train.steps=abc"], "train.steps='abc'"),
    (["--config.train.steps=0"], "train.steps=0"),
    (["--config.model.num_heads=5"], "not divisible by model.num_heads=5"),
    (["--config.model.foo=1"], "model.foo"),
    (["--config.model.preset=gpt_huge"], "model.preset='gpt_huge'"),
    (["--config.model.dtype=float8"], "model.dtype='float8'"),
    (["--config.mesh.data=3"], "3 devices but 8 are available"),
    (["--config.mesh.data=-1", "--config.mesh.fsdp=-1"], "at most one mesh axis may be -1"),
    (["--config.mesh.rules.embedd=fsdp"], "unknown logical axis 'embedd'"),
    (["--config.mesh.rules.mlp=model"], "mesh axis 'model'"),
    (["--config.data.batch_size=12"], "data.batch_size=12"),  # 8 data shards
    (["--config.train.grad_accum_steps=3"], "train.grad_accum_steps=3"),
    (["--config.data.path=x"], "data.path='x'"),
    (["--config.data.name=imagenet"], "data.name='imagenet'"),
    (["--config.model.vocab_size=8"], "model.vocab_size=8 is smaller than the 16 ids"),
    (["--config.optim.schedule=exp"], "optim.schedule='exp'"),
    (["--config.optim.name=adam", "--config.optim.weight_decay=0.1"], "optim.weight_decay=0.1"),
    (["--config.train.label_smoothing=1.5"], "train.label_smoothing=1.5"),
    (["--config.train.steps"], "--config.train.steps: needs a value (--config.train.steps=VALUE)"),
    (["--config.train.steps", "--config.train.tensorboard"], "--config.train.steps: needs a value"),
    (["--config.train.profile_steps=5"], "train.profile_steps='5': expected 'a:b'"),
    (["--config.train.profile_steps=3:2"], "train.profile_steps='3:2'"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[1] for b in BAD])
def test_bad_config_is_refused_before_anything_is_written(tmp_path, capsys, overrides, message):
    workdir = tmp_path / "run"
    rc = train.main(["--config", COPY + ":tiny", "--workdir", str(workdir), *overrides])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("config error: ") and err.count("\n") == 1, err
    assert message in err
    assert not workdir.exists()


def test_overrides_take_every_form_absl_users_type():
    """``--config.k=v``, ``--config.k v`` and a bare boolean ``--config.k``, as ml_collections' config_flags."""
    rest = ["--config.train.steps", "70", "--config.train.tensorboard", "--config.optim.learning_rate=0.5",
            "--config.train.async_checkpoint", "--config.mesh.data", "-1", "--config.model.d_model", "48"]  # fmt: skip
    overrides = cli.split_overrides(rest, error=pytest.fail)
    assert overrides == ["train.steps=70", "train.tensorboard", "optim.learning_rate=0.5", "train.async_checkpoint",
                         "mesh.data=-1", "model.d_model=48"]  # fmt: skip
    base = config_lib.apply_overrides(config_lib.load_config(COPY + ":tiny"),
                                      ["train.tensorboard=false", "train.async_checkpoint=false"])  # fmt: skip
    c = config_lib.apply_overrides(base, overrides)
    assert c.train.steps == 70 and c.train.tensorboard is True and c.train.async_checkpoint is True
    assert c.optim.learning_rate == 0.5 and c.mesh.data == -1 and c.model.d_model == 48
    errors = []
    cli.split_overrides(["--config.train.steps=1", "--workdirr", "x"], error=errors.append)
    assert errors and "unrecognised argument '--workdirr'" in errors[0]


def test_help_lists_every_key_with_its_type_and_default(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for line in ("train.steps (int, default 1000)", "train.tensorboard (bool, default True)",
                 "optim.learning_rate (float, default 0.001)", "model.preset (str, default 'gpt_tiny')"):  # fmt: skip
        assert line in out
    assert "model.FIELD" in out


def test_missing_config_file_and_bad_variant(tmp_path, capsys):
    assert train.main(["--config", "configs/nope.py", "--workdir", str(tmp_path / "a")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert train.main(["--config", COPY + ":huge", "--workdir", str(tmp_path / "a")]) == 2
    assert "unknown variant 'huge'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_missing_data_file_names_the_path(tmp_path, capsys):
    rc = train.main(["--config", os.path.join(ROOT, "configs", "shakespeare_char.py:tiny"), "--workdir",
                     str(tmp_path / "run"), f"--config.data.data_dir={tmp_path}"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and str(tmp_path) in err and "tinyshakespeare/input.txt" in err
    assert not (tmp_path / "run").exists()


def test_data_task_must_match_the_model(tmp_path, capsys):
    recipe = tmp_path / "mismatch.py"
    recipe.write_text(
        "from tfm.config import default_config\n"
        "def get_config(arg=None):\n"
        "    c = default_config()\n"
        "    c.model.preset = 'gpt_tiny'\n"
        "    c.data.name = 'copy'\n"
        "    c.data.batch_size = 8\n"
        "    return c\n"
    )
    assert train.main(["--config", str(recipe), "--workdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "data.name='copy' yields seq2seq batches" in err and "model.preset='gpt_tiny' is a GPT (lm) model" in err
    assert not (tmp_path / "run").exists()


def test_shipped_recipes_load_by_name_and_ship_in_the_package():
    import tomllib

    from tfm import recipes

    assert "copy" in recipes.names() and "shakespeare_char" in recipes.names()
    by_name = config_lib.load_config("tfm:copy:tiny")
    assert by_name.to_dict() == config_lib.load_config(COPY + ":tiny").to_dict() == config_lib.load_config("copy:tiny").to_dict()
    with pytest.raises(config_lib.ConfigError, match="no shipped recipe of that name"):
        config_lib.load_config("tfm:nope")
    # Every subpackage is listed for setuptools, and configs/ is mapped into the package as tfm.configs.
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        setup = tomllib.load(f)["tool"]["setuptools"]
    found = {os.path.relpath(d, ROOT).replace(os.sep, ".") for d, _, files in os.walk(os.path.join(ROOT, "tfm"))
             if "__init__.py" in files}  # fmt: skip
    assert set(setup["packages"]) == found | {"tfm.configs"}
    assert setup["package-dir"]["tfm.configs"] == "configs"


def test_distributed_starts_by_itself_in_a_cluster_jax_detects(monkeypatch):
    """A 2-task SLURM job: every worker runs the same command and JAX's own detection sets the rest."""
    import jax

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for name in [n for n in os.environ if n.startswith(("SLURM_", "OMPI_", "TPU_", "MEGASCALE_"))]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    c = config_lib.load_config(COPY + ":tiny")
    train.maybe_initialize_distributed(c)
    assert calls == [] and train.detected_cluster() is None  # one machine: nothing to start
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node[1-2]")
    assert train.detected_cluster() == "SlurmCluster"
    train.maybe_initialize_distributed(c)
    assert calls == [{}]  # JAX reads the coordinator, process count and id from the environment
    off = config_lib.apply_overrides(c, ["distributed.auto=false"])
    train.maybe_initialize_distributed(off)
    assert len(calls) == 1
