"""Speech recognition metrics: character and word error rates of decoded transcripts.

    CER = (substitutions + deletions + insertions) / reference characters   (Levenshtein, over a corpus)
    WER = the same over words

``evaluate(run, split, batches)`` decodes a speech run's clips with the KV cache
(``tfm.decode``: greedy, or beam search with ``beam_size``) and scores them against the
dataset's transcripts; ``tfm.evaluate`` reports it for every ``speech`` run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance: the fewest substitutions, deletions and insertions turning ``ref`` into ``hyp``."""
    row = np.arange(len(hyp) + 1)
    for i, r in enumerate(ref, start=1):
        prev, row = row, np.empty_like(row)
        row[0] = i
        for j, h in enumerate(hyp, start=1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (r != h))
    return int(row[-1])


def error_rate(refs: Sequence[str], hyps: Sequence[str], unit: str = "char") -> float:
    """Corpus error rate: total edits over total reference length, in characters (``"char"``) or words."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    split = (lambda s: list(s)) if unit == "char" else (lambda s: s.split())
    edits = sum(edit_distance(split(r), split(h)) for r, h in zip(refs, hyps))
    total = sum(len(split(r)) for r in refs)
    return edits / max(total, 1)


def evaluate(run: Any, split: str, transcribe: Callable[[np.ndarray, int], np.ndarray], batches: int = 0) -> dict:
    """CER, WER and sentence accuracy of the first ``batches`` batches of ``split`` (0: all of it);
    ``run`` is a ``tfm.inference.Run``; ``transcribe(features [B, F, M], max_len)`` decodes its clips."""
    ds = run.dataset
    n = ds.num_batches(split) if not batches else min(batches, ds.num_batches(split))
    refs, hyps = [], []
    for i in range(n):
        batch = ds.batch(split, i)
        keep = batch["weights"].sum(axis=1) > 0
        out = transcribe(batch["inputs"], batch["targets"].shape[1])
        hyps += [ds.decode(row) for row in np.asarray(out)[keep]]
        refs += [ds.decode(row) for row in batch["targets"][keep]]
    return {
        "cer": error_rate(refs, hyps, "char"),
        "wer": error_rate(refs, hyps, "word"),
        "sentence_accuracy": float(np.mean([r == h for r, h in zip(refs, hyps)])),
        "examples": len(refs),
        "samples": [{"hyp": h, "ref": r} for h, r in list(zip(hyps, refs))[:3]],
    }


__all__ = ["edit_distance", "error_rate", "evaluate"]
