"""The benchmark's arithmetic: several processes' runs combined into one row."""

import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).parent.parent / "benchmarks" / "vs_pytorch.py"
_spec = importlib.util.spec_from_file_location("vs_pytorch", _PATH)
vs_pytorch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vs_pytorch)


def _run(tfm_ms, torch_ms, loss1=(4.1895, 4.1896)):
    return {
        "shape": "shakespeare", "batch": 12, "seq": 64, "params": 805248,
        "tfm_ms_per_step": tfm_ms, "pytorch_ms_per_step": torch_ms, "speed_ratio_tfm_over_pytorch": torch_ms / tfm_ms,
        "round_ms": {"tfm": [tfm_ms], "pytorch": [torch_ms]},
        "loss_step1": {"tfm": loss1[0], "pytorch": loss1[1], "abs_diff": abs(loss1[0] - loss1[1])},
        "loss_final": {"step": 10, "tfm": 4.0, "pytorch": 4.0},
        "peak_rss_growth_mib": {"tfm": tfm_ms, "pytorch": torch_ms},
    }  # fmt: skip


def test_processes_combine_into_medians_with_the_ratios_range():
    runs = [_run(25.0, 30.0), _run(30.0, 45.0), _run(26.0, 39.0)]  # ratios 1.2, 1.5, 1.5
    r = vs_pytorch.combine(runs)
    assert r["processes"] == 3
    assert r["tfm_ms_per_step"] == 26.0 and r["pytorch_ms_per_step"] == 39.0
    assert r["speed_ratio_tfm_over_pytorch"] == pytest.approx(1.5)
    assert r["speed_ratio_range"] == pytest.approx([1.2, 1.5])
    assert r["tfm_tokens_per_s"] == pytest.approx(12 * 64 / 0.026)
    assert r["peak_rss_growth_mib"] == {"tfm": 26.0, "pytorch": 39.0}
    assert [p["tfm_ms_per_step"] for p in r["per_process"]] == [25.0, 30.0, 26.0]
    # The ratio is the median of the processes' own ratios (1.5, 1.04, 0.9), not that of the medians (30 / 25).
    skewed = vs_pytorch.combine([_run(20.0, 30.0), _run(25.0, 26.0), _run(40.0, 36.0)])
    assert skewed["speed_ratio_tfm_over_pytorch"] == pytest.approx(1.04)
    assert skewed["pytorch_ms_per_step"] / skewed["tfm_ms_per_step"] == pytest.approx(1.2)
    assert "| 1.04x (0.90-1.50x) |" in vs_pytorch.row(skewed)


def test_processes_that_computed_different_losses_are_refused():
    with pytest.raises(ValueError, match="step-1 losses differ"):
        vs_pytorch.combine([_run(25.0, 30.0), _run(25.0, 30.0, loss1=(4.2, 4.2))])
