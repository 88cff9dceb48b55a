"""What a person sees of a run: metric files, the progress display, model FLOPs and MFU.

* ``MetricWriter``: one JSON object per line in ``metrics.jsonl`` and TensorBoard
  event files under ``tensorboard/`` (written with tensorboardX, which needs no
  TensorFlow), and to Weights & Biases when ``train.wandb_project`` names a
  project (the optional ``wandb`` package). Only process 0 writes.
* ``Progress``: a tqdm bar on a terminal; a compact line per log interval otherwise.
* ``peak_flops``: the devices' peak FLOP/s, the denominator of MFU (model FLOPs
  per step come from the task: ``tfm.tasks.Task.flops_per_step``).
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time

import jax

from tfm import storage

# Peak dense bf16 FLOP/s per device (vendor data sheets; SXM parts for GPUs).
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "V100": 125e12,
    "TPU v6 lite": 918e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v4": 275e12,
    "TPU v3": 123e12,
    "TPU v2": 45e12,
}


def peak_flops(device: jax.Device | None = None) -> float | None:
    """Peak FLOP/s of ``device`` (default: the first device) from ``PEAK_FLOPS``, or None if unknown (CPUs)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):  # longest first: "TPU v5 lite" before "TPU v5"
        if name.lower() in kind.lower():
            return PEAK_FLOPS[name]
    return None


def host_peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_peak_bytes() -> int | None:
    """Peak bytes in use on the first local device, where the backend reports it (GPU, TPU)."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        return None
    return None if not stats else stats.get("peak_bytes_in_use")


class MetricWriter:
    """Scalars to ``metrics.jsonl`` and TensorBoard; a no-op on processes other than 0.

    On a cloud workdir the event files are written to a local folder and copied
    up after each write (tensorboardX cannot write object stores itself).
    """

    def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool | None = None,
                 wandb_project: str = "", run_config: dict | None = None):  # fmt: skip
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = self._tb = self._wandb = None
        self._tb_upload = None
        if not self.enabled:
            return
        if wandb_project:
            self._wandb = _wandb_run(workdir, wandb_project, run_config)
        storage.makedirs(workdir)
        self._jsonl = storage.AppendFile(storage.join(workdir, "metrics.jsonl"))
        if tensorboard:
            from tensorboardX import SummaryWriter

            events = storage.join(workdir, "tensorboard")
            if storage.is_remote(workdir):
                self._tb_upload = (tempfile.mkdtemp(prefix="tfm-tensorboard-"), events)
                events = self._tb_upload[0]
            self._tb = SummaryWriter(events)

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items() if v is not None}
        self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **clean}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self._tb.add_scalar(k, v, int(step))
            self._tb.flush()
            if self._tb_upload:
                storage.upload_tree(*self._tb_upload)
        if self._wandb is not None:
            self._wandb.log(clean, step=int(step))

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb:
            self._tb.close()
            if self._tb_upload:
                storage.upload_tree(*self._tb_upload)


def import_wandb(project: str):
    """The wandb module, or ValueError naming ``train.wandb_project`` when it is not installed."""
    try:
        import wandb
    except ImportError:
        raise ValueError(f"train.wandb_project={project!r} needs the wandb package (pip install wandb)") from None
    return wandb


def _wandb_run(workdir: str, project: str, run_config: dict | None):
    """A W&B run for this workdir: its id is kept in ``WORKDIR/wandb_run_id``, so a resumed run
    goes on logging into the same W&B run."""
    wandb = import_wandb(project)
    id_file = storage.join(workdir, "wandb_run_id")
    run_id = storage.read_text(id_file).strip() if storage.exists(id_file) else wandb.util.generate_id()
    storage.write_atomic(id_file, run_id)
    name = str(workdir).rstrip("/").rsplit("/", 1)[-1]
    return wandb.init(project=project, id=run_id, name=name, resume="allow", config=run_config)


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """A tqdm bar (mode ``bar``), a line per log interval (``lines``), or nothing (``none``).

    ``auto`` picks the bar when stderr is a terminal. Only process 0 shows anything.
    """

    def __init__(self, total: int, initial: int, mode: str = "auto", unit: str = "tok", stream=None):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "lines"
        if jax.process_index() != 0:
            mode = "none"
        self.mode, self.total, self.unit = mode, total, unit
        self._bar = None
        self._t0, self._s0 = time.perf_counter(), initial
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, file=self.stream, unit="step", dynamic_ncols=True)

    def update(self, step: int, scalars: dict, log_line: bool) -> None:
        """Called every step with the latest host-side metrics; ``log_line`` marks a log interval."""
        if self.mode == "bar":
            self._bar.update(step - self._bar.n)
            if log_line:
                rate = scalars.get(f"train/{self.unit}_per_sec")
                post = {
                    "loss": f"{scalars.get('train/loss', float('nan')):.4f}",
                    "lr": f"{scalars.get('train/lr', 0):.2e}",
                }
                if rate is not None:
                    post[f"{self.unit}/s"] = f"{rate:,.0f}"
                self._bar.set_postfix(post, refresh=False)
        elif self.mode == "lines" and log_line:
            elapsed = time.perf_counter() - self._t0
            done = step - self._s0
            eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
            parts = [f"step {step}/{self.total}", f"loss {scalars.get('train/loss', float('nan')):.4f}"]
            parts.append(f"lr {scalars.get('train/lr', 0):.2e}")
            rate = scalars.get(f"train/{self.unit}_per_sec")
            if rate is not None:
                parts.append(f"{rate:,.0f} {self.unit}/s")
            if scalars.get("train/step_time_ms") is not None:
                parts.append(f"{scalars['train/step_time_ms']:.1f} ms/step")
            parts.append(f"eta {_fmt_time(eta)}")
            print(" | ".join(parts), file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.mode == "bar":
            self._bar.write(text, file=self.stream)
        elif self.mode == "lines":
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
