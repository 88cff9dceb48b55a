"""``python -m tfm.train --config configs/<recipe>.py[:arg] --workdir DIR [--config.KEY=VALUE ...]``.

Overrides are typed as ml_collections' ``config_flags`` users type them:
``--config.train.steps=100``, ``--config.train.steps 100``, and a bare
``--config.train.tensorboard`` for ``true`` (boolean keys only). ``--help``
lists every key with its type and default. ``--dry_run`` compiles the train
step from shapes alone and prints its per-device memory (XLA's
``memory_analysis``: arguments, outputs, donated buffers, temporaries), then
exits 0 without training or writing the workdir; ``--dry_run_devices N`` does
it for a mesh of N devices that this machine does not have.

A thin shell over ``tfm.trainer.Trainer``: parse, start multi-process JAX if
asked, validate (nothing is written before the config is known to be good),
train, print one summary line. Exit status: 0 when done or stopped by
SIGTERM / SIGINT (after saving), 2 for a bad config or workdir (nothing is
written), 1 when training fails (the last good checkpoint is kept), 130 when
interrupted before training began.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse

    from ml_collections import ConfigDict


def keys_help() -> str:
    """Every key of the run config with its type and default: the epilogue of ``--help``."""
    from tfm.config import default_config

    lines = ["config keys (--config.KEY=VALUE, --config.KEY VALUE, or a bare --config.KEY for a boolean true):"]

    def walk(node, prefix):
        for key in sorted(node.keys()):
            value, name = node[key], f"{prefix}{key}"
            if hasattr(value, "keys"):
                walk(value, name + ".")
            else:
                lines.append(f"  {name} ({type(value).__name__}, default {value!r})")

    walk(default_config(), "")
    lines.append("  model.FIELD: any field of the preset's config or of its block (python -m tfm.summary --config ...)")
    lines.append("  data.OPTION: the options of the dataset named by data.name")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    import argparse as argparse_lib

    from tfm.cli import Parser

    parser = Parser(prog="python -m tfm.train", description=__doc__.split("\n\n")[0], epilog=keys_help(),
                    formatter_class=argparse_lib.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--config", required=True,
                        help="configs/<recipe>.py[:arg], or a shipped recipe by name (copy, tfm:shakespeare_char:tiny)")
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics and the resolved config go here")
    parser.add_argument(
        "--allow_model_change", action="store_true", help="train a different model config in an existing workdir"
    )
    parser.add_argument("--dry_run", action="store_true",
                        help="compile the train step, print its per-device memory, and exit without training")
    parser.add_argument("--dry_run_devices", type=int, default=0, metavar="N",
                        help="with --dry_run: compile for a mesh of N (CPU) devices this machine need not have, "
                             "to see what a larger target mesh needs per device")  # fmt: skip
    args, rest = parser.parse_known_args(argv)
    from tfm.cli import split_overrides

    return args, split_overrides(rest, parser.error)


def detected_cluster() -> str | None:
    """The multi-process cluster JAX can configure itself from the environment (Cloud TPU pod slices,
    SLURM, Open MPI, Kubernetes/GKE), when it runs more than one process; else None."""
    try:
        from jax._src import clusters
    except ImportError:  # JAX moved its cluster detection: fall back to explicit configuration
        return None
    for env in clusters.ClusterEnv._cluster_types:
        try:
            if env.is_env_present() and int(env.get_process_count()) > 1:
                return env.__name__
        except Exception:  # noqa: BLE001 - a half-configured environment is not a cluster
            continue
    return None


def maybe_initialize_distributed(config: ConfigDict) -> None:
    """``jax.distributed.initialize`` when the config asks for it, ``JAX_COORDINATOR_ADDRESS`` is set,
    or (``distributed.auto``) JAX detects a multi-process cluster, so pod workers launched with the
    same command train as one job."""
    import jax

    d = config.distributed
    cluster = detected_cluster() if d.get("auto", True) else None
    if not (d.enabled or os.environ.get("JAX_COORDINATOR_ADDRESS") or cluster):
        return
    if cluster and not d.enabled:
        logging.getLogger("tfm").info("starting jax.distributed: detected a %s environment", cluster)
    kwargs = {}
    if d.coordinator_address:
        kwargs["coordinator_address"] = d.coordinator_address
    if d.num_processes > 0:
        kwargs["num_processes"] = d.num_processes
    if d.process_id >= 0:
        kwargs["process_id"] = d.process_id
    jax.distributed.initialize(**kwargs)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = sys.argv[1:] if argv is None else argv
    args, overrides = parse_args(argv)
    if args.dry_run_devices:
        return dry_run_on_devices(argv, args.dry_run_devices)

    from tfm import config as config_lib

    try:
        config = config_lib.apply_overrides(config_lib.load_config(args.config), overrides)
        config_lib.validate(config)  # schema, model and optimizer checks; needs no devices
    except config_lib.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    try:
        from tfm import host_memory

        host_memory.dispatch_inline()  # before any backend starts: the CPU step's buffer stays on the main heap
        maybe_initialize_distributed(config)
        from tfm import diagnosis
        from tfm.checkpoint import CheckpointError
        from tfm.cli import stdout_to_stderr
        from tfm.storage import StorageError
        from tfm.trainer import Trainer, TrainingError, format_summary

        try:
            with stdout_to_stderr():  # stdout carries only the summary line
                trainer = Trainer(config, args.workdir, allow_model_change=args.allow_model_change)
                if args.dry_run:
                    report = diagnosis.memory_report(trainer)
                else:
                    summary = trainer.train()
        except (config_lib.ConfigError, StorageError) as e:
            print(f"config error: {e}", file=sys.stderr)
            return 2
        except (TrainingError, CheckpointError) as e:
            print(f"training stopped: {e}", file=sys.stderr)
            return 1
        except Exception as e:  # an accelerator out of memory: say what to turn, not a raw XLA error
            if not is_out_of_memory(e):
                raise
            print(out_of_memory_message(e, config), file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        print("interrupted; the checkpoints already on disk are kept", file=sys.stderr)
        return 130
    if args.dry_run:
        print(format_memory(report, diagnosis.banner(trainer)), flush=True)
        return 0
    print(format_summary(summary), flush=True)
    return 0


def is_out_of_memory(e: BaseException) -> bool:
    import jax

    text = str(e)
    return isinstance(e, jax.errors.JaxRuntimeError) and ("RESOURCE_EXHAUSTED" in text or "Out of memory" in text)


def out_of_memory_message(e: BaseException, config: ConfigDict) -> str:
    """One line: what XLA could not allocate, and the knobs that shrink the step, with this run's values."""
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    m, t, d = config.model, config.train, config.data
    return (
        f"out of memory: {first[:300]} | the checkpoints already on disk are kept. To fit: "
        f"--config.model.remat_policy=full (now {m.get('remat_policy', 'none')!r}), "
        f"--config.train.grad_accum_steps={2 * t.grad_accum_steps} (now {t.grad_accum_steps}), "
        f"--config.mesh.fsdp=-1 to shard parameters and optimizer state (now {config.mesh.fsdp}), "
        f"--config.model.dtype=bfloat16 (now {m.get('dtype', 'float32')!r}), "
        f"or a smaller --config.data.batch_size (now {d.batch_size}); --dry_run prints the step's memory per device"
    )


def dry_run_on_devices(argv: list[str], n: int) -> int:
    """``--dry_run`` in a fresh process that has ``n`` CPU devices (the device count is fixed when
    JAX starts). The sizes of the arguments and of the sharded state per device are those of an
    accelerator mesh of the same shape; temporaries and code size depend on the backend."""
    import subprocess

    if n < 1:
        print(f"config error: --dry_run_devices={n}: must be at least 1", file=sys.stderr)
        return 2
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--dry_run_devices":
            skip = True
        elif not a.startswith("--dry_run_devices="):
            rest.append(a)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = " ".join([*[f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f],
                                 f"--xla_force_host_platform_device_count={n}"])  # fmt: skip
    cmd = [sys.executable, "-m", "tfm.train", *rest, "--dry_run", "--config.distributed.auto=false"]
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    if p.returncode == 0:
        print(f"compiled for {n} CPU devices standing in for the target mesh: arguments and state per device "
              f"carry over to accelerators of that mesh; temporaries and code depend on the backend")  # fmt: skip
    print(p.stdout, end="", flush=True)
    return p.returncode


def format_memory(report: dict, banner: str) -> str:
    """The ``--dry_run`` lines: what the run is, and the compiled step's memory per device."""
    mib = lambda n: f"{n / 2**20:,.1f} MiB"  # noqa: E731
    return "\n".join([
        f"dry run: {banner}",
        f"per device: peak {mib(report['peak'])} = arguments {mib(report['argument'])} + outputs "
        f"{mib(report['output'])} - donated {mib(report['alias'])} + temporaries {mib(report['temp'])}; "
        f"of the arguments, the training state is {mib(report['state'])}; code {mib(report['generated_code'])}",
    ])  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
