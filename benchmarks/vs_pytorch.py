"""tfm's training step against a plain PyTorch GPT of the same shape, weights and optimizer, side by side.

    python benchmarks/vs_pytorch.py [--shapes shakespeare,wide] [--rounds 3] [--steps N] [--processes 5]
                                    [--out results/vs_pytorch.json]

The PyTorch model is written from the equations the way people write one:
``nn.Embedding``, ``nn.Linear`` (a fused QKV projection, as nanoGPT), ``nn.LayerNorm``,
``F.scaled_dot_product_attention(is_causal=True)``, exact GELU, a tied output
projection, ``torch.optim.AdamW`` with decay on the matrices and embeddings only,
global-norm clipping, float32, eager (no ``torch.compile``). It starts from a
copy of tfm's initial parameters and follows tfm's learning-rate schedule, and
both sides see the same batches, so their losses at step 1 agree to float32
rounding: the same computation.

tfm runs through its ``Trainer`` (the jitted, donated step the CLI uses; the
batch placed from numpy each step). The sides alternate, A B A B, for
``--rounds`` rounds of ``--steps`` steps after a warm-up (by default 200 for
shakespeare and 10 for the wide shape, whose 3 x 200 steps a side would take over
an hour and a half); a round's time is its wall time over its steps (tfm's steps
are dispatched as in training: on the calling thread on CPU, asynchronously on an
accelerator; the round waits for the last one). The medians over rounds are
printed and written to ``--out``, with each side's peak memory: the growth of
the process's resident memory during one more, untimed round of up to 10 steps
(sampled every millisecond by a thread whose work would slow a timed round),
and XLA's plan for tfm's compiled step.

All of that runs in ``--processes`` fresh processes, one after the other (default 5),
and the medians over them are reported: the ratio as the median of the processes'
own ratios, with its range. One process's ratio is not steady enough to report
alone: PyTorch's step on this kind of 2-core machine has moved by up to a fifth from one
process to the next (the same code, weights and batches), while its rounds within a
process agree to a few percent. Each process's figures are kept in the JSON.

``--plain`` turns off the fast paths that tfm picks by backend
(``tfm.layers.tuning``, and ``tfm.host_memory``, which keeps the step's freed
buffer mapped between steps), to measure what they save on the machine at hand.
The heap that ``tfm.host_memory`` keeps is the process's, so the PyTorch side,
measured in the same process, runs with it too (``--plain`` measures both
without it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tfm import config as config_lib  # noqa: E402
from tfm import host_memory  # noqa: E402
from tfm.layers import tuning  # noqa: E402
from tfm.optim import decay_mask  # noqa: E402
from tfm.trainer import Trainer  # noqa: E402

# The shakespeare_char recipe's model and optimizer, and a wider model.
SHAPES = {
    "shakespeare": dict(d_model=128, num_heads=4, num_layers=4, d_ff=512, vocab=65, seq=64, batch=12),
    "wide": dict(d_model=512, num_heads=8, num_layers=8, d_ff=2048, vocab=65, seq=256, batch=8),
}
DEFAULT_STEPS = {"shakespeare": 200, "wide": 10}  # steps per round


def tfm_config(shape: dict, extra=()):
    c = config_lib.load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "shakespeare_char.py"))
    s = shape
    overrides = [f"model.{k}={s[k]}" for k in ("d_model", "num_heads", "num_layers", "d_ff")]
    overrides += [f"model.vocab_size={s['vocab']}", f"model.max_len={s['seq']}", "mesh.data=1",
                  "train.progress=none", "train.tensorboard=false"]  # fmt: skip
    c = config_lib.apply_overrides(c, overrides + list(extra))
    # Random tokens of the same shapes instead of the corpus: the step's cost does not depend on the text.
    c.data = config_lib.ml_collections.ConfigDict(
        dict(name="synthetic_lm", batch_size=s["batch"], vocab_size=s["vocab"], seq_len=s["seq"])
    )
    return c


def torch_gpt(shape: dict, params, torch):
    """The PyTorch GPT, its weights copied from tfm's ``params``."""
    nn, F = torch.nn, torch.nn.functional
    d, h, layers, f = shape["d_model"], shape["num_heads"], shape["num_layers"], shape["d_ff"]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.c_attn, self.c_proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
            self.fc, self.proj = nn.Linear(d, f, bias=False), nn.Linear(f, d, bias=False)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
            q, k, v = (z.view(b, t, h, d // h).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
            x = x + self.c_proj(y)
            return x + self.proj(F.gelu(self.fc(self.ln_2(x))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(shape["vocab"], d), nn.Embedding(shape["seq"], d)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.ln_f = nn.LayerNorm(d)

        def forward(self, idx):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for block in self.blocks:
                x = block(x)
            return self.ln_f(x) @ self.wte.weight.T  # tied output projection

    model = GPT()
    p = jax.tree.map(np.asarray, params)
    t = lambda a: torch.tensor(np.ascontiguousarray(a))  # noqa: E731
    dec = p["decoder"]
    if "layers" in dec:  # scanned: every leaf has a leading layer axis
        per_layer = [jax.tree.map(lambda a, i=i: a[i], dec["layers"]) for i in range(layers)]
    else:
        per_layer = [dec[f"layers_{i}"] for i in range(layers)]
    with torch.no_grad():
        model.wte.weight.copy_(t(p["embed"]["embedding"]))
        model.wpe.weight.copy_(t(p["pos_embed"]["embedding"]))
        model.ln_f.weight.copy_(t(p["decoder"]["final_norm"]["scale"]))
        model.ln_f.bias.copy_(t(p["decoder"]["final_norm"]["bias"]))
        for block, L in zip(model.blocks, per_layer):
            a = L["self_attention"]
            qkv = [a[n]["kernel"].reshape(d, d).T for n in ("query", "key", "value")]  # [D, N, H] -> [NH, D]
            block.c_attn.weight.copy_(t(np.concatenate(qkv, 0)))
            block.c_proj.weight.copy_(t(a["out"]["kernel"].reshape(d, d).T))  # [N, H, D] -> [D, NH]
            block.fc.weight.copy_(t(L["mlp"]["wi"]["kernel"].T))
            block.proj.weight.copy_(t(L["mlp"]["wo"]["kernel"].T))
            for ln, name in ((block.ln_1, "attention_norm"), (block.ln_2, "mlp_norm")):
                ln.weight.copy_(t(L[name]["scale"]))
                ln.bias.copy_(t(L[name]["bias"]))
    return model


def torch_optimizer(model, config, schedule, torch):
    o = config.optim
    decayed = [p for n, p in model.named_parameters() if n.endswith("weight") and ("ln" not in n)]
    others = [p for n, p in model.named_parameters() if not (n.endswith("weight") and "ln" not in n)]
    opt = torch.optim.AdamW([{"params": decayed, "weight_decay": o.weight_decay}, {"params": others, "weight_decay": 0.0}],
                            lr=1.0, betas=(o.b1, o.b2), eps=o.eps)  # fmt: skip
    lr_at = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: float(schedule(step)))  # tfm's schedule, exactly
    return opt, lr_at


def check_decay_groups(params):
    """tfm decays exactly the kernels and embeddings; the PyTorch groups above mirror that."""
    mask = jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]
    decayed = {"/".join(str(k.key) for k in path) for path, on in mask if on}
    assert all(name.endswith(("kernel", "embedding")) for name in decayed), decayed
    return len(decayed)


def run_torch(model, opt, lr_at, batches, clip, torch):
    losses = []
    for batch in batches:
        x, y = torch.from_numpy(batch["inputs"]).long(), torch.from_numpy(batch["targets"]).long()
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        lr_at.step()
        losses.append(loss.detach())
    return [float(v) for v in losses]


class PeakRSS:
    """The peak growth of this process's resident memory while the block runs (sampled every ms).

    Both sides run in one process: freed memory is first returned to the OS
    (glibc ``malloc_trim``), so each side's working set for a step shows as the
    growth over the memory resident before its round (parameters and optimizer
    state, already resident, are not counted).
    """

    def __enter__(self):
        import ctypes
        import threading

        try:  # hand memory freed by earlier steps back to the OS, so that this block's working set shows as growth
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.base) / 2**20

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_tfm(trainer, step_fn, state, batches):
    metrics = []
    for batch in batches:
        state, m = step_fn(state, batch)
        metrics.append(m["loss"])
    return state, [float(v) for v in jax.device_get(metrics)]


def bench(name, shape, rounds, steps, torch, extra=()):
    config = tfm_config(shape, extra)
    trainer = Trainer(config, devices=jax.devices()[:1])
    state = trainer.init_state()
    check_decay_groups(state.params)
    model = torch_gpt(shape, state.params, torch)
    opt, lr_at = torch_optimizer(model, config, trainer.schedule, torch)
    clip = config.optim.clip_norm
    it = trainer.dataset.iterator("train")
    warm = 5
    mem_steps = min(steps, 10)  # the untimed round per side that measures peak memory
    total = warm + rounds * steps + mem_steps
    batches = [next(it) for _ in range(total)]
    step = trainer.compile_step(state, trainer.place(batches[0]))
    mem = step.memory_analysis()

    def tfm_steps(state, chunk):
        return run_tfm(trainer, lambda s, b: step(s, trainer.place(b)), state, chunk)

    state, tfm_losses = tfm_steps(state, batches[:warm])
    torch_losses = run_torch(model, opt, lr_at, batches[:warm], clip, torch)
    times = {"tfm": [], "pytorch": []}
    peak = {"tfm": 0.0, "pytorch": 0.0}
    for r in range(rounds):
        chunk = batches[warm + r * steps : warm + (r + 1) * steps]
        t0 = time.perf_counter()
        state, losses = tfm_steps(state, chunk)  # waits for the last step's loss
        times["tfm"].append((time.perf_counter() - t0) / steps)
        tfm_losses += losses
        t0 = time.perf_counter()
        torch_losses += run_torch(model, opt, lr_at, chunk, clip, torch)
        times["pytorch"].append((time.perf_counter() - t0) / steps)
    # Peak memory in a round of its own per side: the sampling thread takes CPU time from the step
    # (~8 % of tfm's step and ~14 % of PyTorch's at the wide shape), so no timed round runs it.
    chunk = batches[total - mem_steps :]
    with PeakRSS() as rss:
        state, losses = tfm_steps(state, chunk)
    peak["tfm"], tfm_losses = rss.growth_mib, tfm_losses + losses
    with PeakRSS() as rss:
        torch_losses += run_torch(model, opt, lr_at, chunk, clip, torch)
    peak["pytorch"] = rss.growth_mib
    tokens = shape["batch"] * shape["seq"]
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "shape": name, **shape,
        "params": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "steps_per_round": steps, "rounds": rounds,
        "tfm_ms_per_step": med["tfm"] * 1e3, "pytorch_ms_per_step": med["pytorch"] * 1e3,
        "tfm_tokens_per_s": tokens / med["tfm"], "pytorch_tokens_per_s": tokens / med["pytorch"],
        "speed_ratio_tfm_over_pytorch": med["pytorch"] / med["tfm"],
        "round_ms": {k: [t * 1e3 for t in v] for k, v in times.items()},
        "loss_step1": {"tfm": tfm_losses[0], "pytorch": torch_losses[0], "abs_diff": abs(tfm_losses[0] - torch_losses[0])},
        "loss_final": {"step": total, "tfm": tfm_losses[-1], "pytorch": torch_losses[-1]},
        "peak_rss_growth_mib": peak,
        "tfm_xla_bytes": {"temp": getattr(mem, "temp_size_in_bytes", None),
                          "arguments": getattr(mem, "argument_size_in_bytes", None)},
    }  # fmt: skip


def machine_line(torch) -> str:
    """The device, core count and library versions, as the benchmarks print and record them."""
    dev = jax.devices()[0]
    return f"{dev.platform}: {dev.device_kind}; {os.cpu_count()} cores; torch {torch.__version__} " \
           f"({torch.get_num_threads()} threads), jax {jax.__version__}"  # fmt: skip


def combine(runs: list[dict]) -> dict:
    """One shape's results from several processes: medians of their medians, each process's figures kept.

    The ratio is the median of the processes' own ratios (each pairs its two sides in time); the
    step-1 losses must agree across processes (the same weights and batches in each).
    """
    first = runs[0]
    if any(r["loss_step1"] != first["loss_step1"] for r in runs):
        raise ValueError(f"{first['shape']}: the processes' step-1 losses differ: {[r['loss_step1'] for r in runs]}")
    med = {k: statistics.median(r[k] for r in runs)
           for k in ("tfm_ms_per_step", "pytorch_ms_per_step", "speed_ratio_tfm_over_pytorch")}  # fmt: skip
    tokens = first["batch"] * first["seq"]
    ratios = [r["speed_ratio_tfm_over_pytorch"] for r in runs]
    return {
        **{k: v for k, v in first.items() if k not in ("round_ms", "loss_final", "peak_rss_growth_mib")},
        **med, "processes": len(runs),
        "tfm_tokens_per_s": tokens / med["tfm_ms_per_step"] * 1e3,
        "pytorch_tokens_per_s": tokens / med["pytorch_ms_per_step"] * 1e3,
        "speed_ratio_range": [min(ratios), max(ratios)],
        "loss_final": first["loss_final"],
        "peak_rss_growth_mib": {k: statistics.median(r["peak_rss_growth_mib"][k] for r in runs)
                                for k in ("tfm", "pytorch")},  # fmt: skip
        "per_process": [{k: r[k] for k in ("tfm_ms_per_step", "pytorch_ms_per_step", "speed_ratio_tfm_over_pytorch",
                                            "round_ms", "peak_rss_growth_mib")} for r in runs],  # fmt: skip
    }


def row(r: dict) -> str:
    m, name = r["peak_rss_growth_mib"], r["shape"]
    spread = f" ({r['speed_ratio_range'][0]:.2f}-{r['speed_ratio_range'][1]:.2f}x)" if "speed_ratio_range" in r else ""
    return (f"| {name} | {r['params'] / 1e6:.2f} M | {r['batch']} x {r['seq']} | {r['pytorch_ms_per_step']:.1f} | "
            f"{r['tfm_ms_per_step']:.1f} | {r['speed_ratio_tfm_over_pytorch']:.2f}x{spread} | "
            f"{r['loss_step1']['tfm']:.6f}, {r['loss_step1']['pytorch']:.6f} | "
            f"{r['loss_final']['tfm']:.4f}, {r['loss_final']['pytorch']:.4f} | {m['tfm']:.0f}, {m['pytorch']:.0f} |")


def run_processes(args) -> tuple[str, list[dict]]:
    """Runs this benchmark in ``args.processes`` fresh processes, one after the other, and combines them."""
    import subprocess
    import tempfile

    per_shape: dict[str, list[dict]] = {}
    machine = ""
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.processes):
            out = os.path.join(tmp, f"{i}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--processes", "1", "--shapes", args.shapes,
                   "--rounds", str(args.rounds), "--out", out, *sum((["--set", s] for s in args.set), [])]
            cmd += (["--steps", str(args.steps)] if args.steps else []) + (["--plain"] if args.plain else [])
            print(f"process {i + 1} of {args.processes}:", flush=True)
            subprocess.run(cmd, check=True)
            with open(out, encoding="utf-8") as f:
                run = json.load(f)
            machine = run["machine"]
            for r in run["results"]:
                per_shape.setdefault(r["shape"], []).append(r)
    return machine, [combine(runs) for runs in per_shape.values()]


HEADER = ("| shape | params | batch x seq | PyTorch ms/step | tfm ms/step | tfm / PyTorch speed | "
          "loss step 1 (tfm, PyTorch) | loss last step (tfm, PyTorch) | peak RSS growth MiB (tfm, PyTorch) |\n"
          "|---|---:|---|---:|---:|---:|---|---|---|")  # fmt: skip


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="shakespeare,wide")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="steps per round (default: 200 shakespeare, 10 wide)")
    p.add_argument("--processes", type=int, default=5,
                   help="fresh processes to run it in, one after the other; the medians over them are reported")
    p.add_argument("--out", default="results/vs_pytorch.json",
                   help="JSON of the results; entries of shapes not run now are kept ('' writes nothing)")
    p.add_argument("--set", action="append", default=[], help="a tfm config override, e.g. model.scan_layers=false")
    p.add_argument("--plain", action="store_true",
                   help="turn off tfm's backend-picked fast paths (tfm.layers.tuning): the step as written")
    args = p.parse_args()
    if args.processes < 1:
        p.error(f"--processes must be at least 1, got {args.processes}")
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        p.error(f"unknown shape(s) {', '.join(unknown)}; known: {', '.join(SHAPES)}")
    if args.processes > 1:
        machine, results = run_processes(args)
        print(f"machine: {machine}; medians over {args.processes} processes (the ratio's range in brackets)")
        print(HEADER)
        for r in results:
            print(row(r))
    else:
        machine, results = run_here(args)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        kept = []
        if os.path.exists(args.out):
            with open(args.out, encoding="utf-8") as f:
                kept = [r for r in json.load(f).get("results", []) if r.get("shape") not in args.shapes.split(",")]
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"machine": machine, "host": platform.machine(), "results": kept + results}, f, indent=2)
            f.write("\n")


def run_here(args) -> tuple[str, list[dict]]:
    """This process's run: each shape in turn, A B A B."""
    import torch

    if args.plain:
        tuning.FOLD_TO_MATMUL, tuning.FUSED_QKV, tuning.UNROLL_LAYERS = False, False, 0
        tuning.CAUSAL_BLOCK_ROWS = 0
        tuning.CONV_AS_MATMUL = tuning.CPU_ATTENTION = tuning.FUSED_OPTIMIZER = tuning.HAND_VJP = False
        tuning.CPU_ROWWISE = False
        host_memory.RESERVE = False
    host_memory.dispatch_inline()  # as python -m tfm.train does
    machine = machine_line(torch)
    print(f"machine: {machine}")
    print(HEADER)
    results = []
    for name in args.shapes.split(","):
        r = bench(name, SHAPES[name], args.rounds, args.steps or DEFAULT_STEPS[name], torch, args.set)
        r["fast_paths"] = not args.plain
        results.append(r)
        print(row(r), flush=True)
    return machine, results


if __name__ == "__main__":
    main()
