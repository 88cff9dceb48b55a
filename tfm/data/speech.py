"""Spoken digits synthesised offline: a formant (source–filter) speech model with random speakers.

Each clip says 1 to ``max_digits`` digit words ("three one four"). A word is a fixed string of
phonemes; a phoneme is a target for the vocal tract (three formant frequencies), the voicing and
a band of frication noise. The synthesiser (Klatt-style, much simplified):

* source: a glottal pulse train at the pitch ``f0`` (with a falling contour and jitter),
  low-passed; frication: white noise;
* filter: the voiced source through three cascaded two-pole resonators at the formants,
  the noise through one resonator at the fricative's band; both change every 5 ms, following
  targets smoothed over 20 ms (coarticulation); stops are a closure and a burst;
* speaker and take: vocal-tract length (formants x 0.85–1.2), pitch 85–250 Hz, speaking
  rate 0.8–1.25, pauses, loudness, and background noise at 5–30 dB SNR.

Clip ``j`` of a split is a pure function of ``(seed, split, j)``, so a split's clips do not
depend on how many are drawn. Features are Whisper's log-mel frames
(``tfm.layers.audio.log_mel_spectrogram``) of the clip zero-padded to ``clip_seconds``.

The dataset (``speech_digits``, task ``speech``) synthesises each split once, when first read:
``train_size`` clips for training (reshuffled every epoch: batch ``i`` is a pure function of
``(seed, i)``), ``eval_size`` each for ``validation`` and ``test`` (other speakers and takes, read
in order). Transcripts are characters: ``0`` pads, ``1`` starts, ``2`` ends, then space and a–z.
Batches: ``inputs [B, frames, n_mels]`` float32, ``decoder_inputs``, ``targets`` and ``weights [B, T]``.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy.signal import lfilter

from tfm.data.base import DataError, RowReadingDataset, shift_right
from tfm.layers.audio import HOP_LENGTH, SAMPLE_RATE

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PRONUNCIATION = {
    "zero": "Z IH R OW", "one": "W AH N", "two": "T UW", "three": "TH R IY", "four": "F AO R",
    "five": "F AY V", "six": "S IH K S", "seven": "S EH V AH N", "eight": "EY T", "nine": "N AY N",
}  # fmt: skip
# phoneme: (F1, F2, F3 in Hz, voicing 0..1, noise level, noise centre Hz, noise bandwidth Hz, duration s).
# Formants of an adult male voice (Peterson & Barney 1952 for the vowels); glides are lists of targets.
PHONEMES = {
    "IY": [(270, 2290, 3010, 1.0, 0.0, 0, 0, 0.13)],
    "IH": [(390, 1990, 2550, 1.0, 0.0, 0, 0, 0.09)],
    "EH": [(530, 1840, 2480, 1.0, 0.0, 0, 0, 0.10)],
    "AH": [(640, 1190, 2390, 1.0, 0.0, 0, 0, 0.10)],
    "AO": [(570, 840, 2410, 1.0, 0.0, 0, 0, 0.14)],
    "UW": [(300, 870, 2240, 1.0, 0.0, 0, 0, 0.14)],
    "OW": [(500, 950, 2400, 1.0, 0.0, 0, 0, 0.08), (340, 800, 2300, 1.0, 0.0, 0, 0, 0.08)],
    "AY": [(730, 1090, 2440, 1.0, 0.0, 0, 0, 0.10), (400, 1900, 2600, 1.0, 0.0, 0, 0, 0.08)],
    "EY": [(480, 1850, 2500, 1.0, 0.0, 0, 0, 0.09), (300, 2200, 2900, 1.0, 0.0, 0, 0, 0.07)],
    "R": [(420, 1300, 1600, 0.8, 0.0, 0, 0, 0.07)],
    "W": [(300, 650, 2200, 0.7, 0.0, 0, 0, 0.07)],
    "N": [(250, 1450, 2500, 0.35, 0.0, 0, 0, 0.07)],
    "V": [(300, 1200, 2300, 0.35, 0.15, 3500, 3000, 0.07)],
    "Z": [(250, 1700, 2600, 0.35, 0.35, 5000, 2000, 0.09)],
    "S": [(400, 1700, 2600, 0.0, 0.6, 6000, 2000, 0.11)],
    "F": [(400, 1300, 2400, 0.0, 0.15, 4000, 6000, 0.10)],
    "TH": [(400, 1400, 2500, 0.0, 0.08, 5000, 6000, 0.09)],
    "T": [(400, 1700, 2600, 0.0, 0.0, 0, 0, 0.04), (400, 1700, 2600, 0.0, 0.7, 4500, 3000, 0.025)],
    "K": [(400, 1700, 2600, 0.0, 0.0, 0, 0, 0.04), (400, 1700, 2600, 0.0, 0.7, 2000, 1500, 0.025)],
}
BANDWIDTHS = (60.0, 90.0, 150.0)
FRAME = 80  # samples per control frame: 5 ms


def _resonator(freq: float, bandwidth: float) -> tuple[np.ndarray, np.ndarray]:
    """A two-pole resonator with unit gain at 0 Hz: ``(b, a)`` for ``lfilter``."""
    r = np.exp(-np.pi * bandwidth / SAMPLE_RATE)
    a = np.array([1.0, -2.0 * r * np.cos(2.0 * np.pi * freq / SAMPLE_RATE), r * r])
    return np.array([a.sum()]), a


def _filter_framewise(x: np.ndarray, freqs: np.ndarray, bandwidth: np.ndarray) -> np.ndarray:
    """``x`` through a resonator whose frequency (and bandwidth) may change every ``FRAME`` samples; the
    state carries over. Runs of frames with the same values are filtered in one call."""
    out, state = np.empty_like(x), np.zeros(2)
    change = np.flatnonzero((np.diff(freqs) != 0) | (np.diff(bandwidth) != 0)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [len(freqs)]])
    for i, j in zip(starts, ends):
        b, a = _resonator(freqs[i], bandwidth[i])
        seg = slice(i * FRAME, j * FRAME)
        out[seg], state = lfilter(b, a, x[seg], zi=state)
    return out


def _tracks(words: list[str], rng: np.random.Generator, rate: float, formant_scale: float) -> np.ndarray:
    """Control tracks ``[frames, 7]``: F1, F2, F3, voicing, noise level, noise centre, noise bandwidth."""
    silence = (500, 1500, 2500, 0.0, 0.0, 1000, 1000)
    rows = [silence] * int(rng.integers(2, 30))  # 10-150 ms before speech
    for w, word in enumerate(words):
        if w:
            rows += [silence] * int(rng.integers(4, 24) / rate)
        for ph in PRONUNCIATION[word].split():
            for *target, duration in PHONEMES[ph]:
                frames = max(2, int(round(duration / rate * rng.uniform(0.8, 1.25) * SAMPLE_RATE / FRAME)))
                jitter = rng.uniform(0.95, 1.05, size=3)
                f = tuple(np.array(target[:3]) * formant_scale * jitter)
                rows += [(*f, *target[3:])] * frames
    rows += [silence] * int(rng.integers(4, 20))
    tracks = np.array(rows, np.float64)
    kernel = np.ones(4) / 4  # 20 ms of coarticulation
    smooth = np.stack([np.convolve(np.pad(c, (2, 1), mode="edge"), kernel, mode="valid") for c in tracks.T], axis=1)
    smooth[:, 4] = np.convolve(np.pad(tracks[:, 4], (1, 0), mode="edge"), np.ones(2) / 2, mode="valid")  # bursts stay sharp
    return smooth


def synthesize(words: list[str], rng: np.random.Generator) -> np.ndarray:
    """One take of ``words`` by a random speaker: float32 samples at 16 kHz, peak about 0.1–0.9."""
    formant_scale, f0, rate = rng.uniform(0.85, 1.2), rng.uniform(85.0, 250.0), rng.uniform(0.8, 1.25)
    tracks = _tracks(words, rng, rate, formant_scale)
    n = len(tracks) * FRAME
    t = np.arange(n) / n
    pitch = f0 * (1.1 - 0.2 * t) * (1 + 0.01 * rng.standard_normal(n).cumsum() / np.sqrt(n) * 10)
    phase = np.cumsum(pitch / SAMPLE_RATE)
    pulses = np.diff(np.floor(phase), prepend=0.0)  # one impulse per glottal period
    source = lfilter([1.0], [1.0, -0.97], lfilter([1.0], [1.0, -0.9], pulses))  # glottal roll-off
    voicing = np.repeat(tracks[:, 3], FRAME)
    voiced = source * voicing
    for k in range(3):
        voiced = _filter_framewise(voiced, tracks[:, k], np.full(len(tracks), BANDWIDTHS[k] * formant_scale))
    voiced = np.diff(voiced, prepend=0.0)  # lip radiation
    noise = rng.standard_normal(n) * np.repeat(tracks[:, 4], FRAME)
    centre = np.minimum(tracks[:, 5] * np.sqrt(formant_scale), 7000.0)
    fric = _filter_framewise(noise, np.maximum(centre, 100.0), np.maximum(tracks[:, 6], 100.0))
    speech = voiced / (np.abs(voiced).max() + 1e-9) + 0.5 * fric / (np.abs(fric).max() + 1e-9) * (tracks[:, 4].max() > 0)
    speech *= rng.uniform(0.1, 0.9) / (np.abs(speech).max() + 1e-9)
    snr_db = rng.uniform(5.0, 30.0)
    power = np.mean(speech[voicing > 0] ** 2) if np.any(voicing > 0) else np.mean(speech**2)
    speech += rng.standard_normal(n) * np.sqrt(power / 10 ** (snr_db / 10))
    return speech.astype(np.float32)


def draw(rng: np.random.Generator, max_digits: int) -> list[str]:
    """The words of one clip: 1 to ``max_digits`` digits, uniform."""
    return [DIGITS[d] for d in rng.integers(0, 10, size=int(rng.integers(1, max_digits + 1)))]


PAD, BOS, EOS = 0, 1, 2
ALPHABET = " abcdefghijklmnopqrstuvwxyz"
SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


@functools.lru_cache(maxsize=1)
def _log_mel(n_mels: int):
    import jax

    from tfm.layers.audio import log_mel_spectrogram

    return jax.jit(lambda audio: log_mel_spectrogram(audio, n_mels))


class SpeechDigits(RowReadingDataset):
    """Synthetic spoken digit strings -> their words (``speech_digits``, task ``speech``); needs no files."""

    task = "speech"
    SPLITS = tuple(SPLIT_IDS)
    OPTIONS = dict(train_size=6000, eval_size=500, max_digits=4, clip_seconds=2.56, n_mels=80, seed=0)

    def __init__(self, *, batch_size, train_size, eval_size, max_digits, clip_seconds, n_mels, seed):
        if min(train_size, eval_size, max_digits) < 1:
            raise DataError(f"data.train_size={train_size}, data.eval_size={eval_size}, data.max_digits={max_digits}: "
                            f"each must be >= 1")  # fmt: skip
        self.samples = int(round(clip_seconds * SAMPLE_RATE / (2 * HOP_LENGTH))) * 2 * HOP_LENGTH  # even frames
        if self.samples < SAMPLE_RATE:
            raise DataError(f"data.clip_seconds={clip_seconds}: clips need at least 1 s (one digit takes up to ~0.7 s)")
        self.batch_size, self.max_digits, self.n_mels, self.seed = batch_size, max_digits, n_mels, seed
        self.sizes = {"train": train_size, "validation": eval_size, "test": eval_size}
        self.vocab_size, self.pad_id, self.bos_id, self.eos_id = 3 + len(ALPHABET), PAD, BOS, EOS
        self.frames = self.samples // HOP_LENGTH
        self.max_target = 6 * max_digits  # "seven" x n with spaces, and the EOS
        self._pools: dict[str, dict[str, np.ndarray]] = {}

    def encode(self, text: str) -> np.ndarray:
        unknown = sorted(set(text) - set(ALPHABET))
        if unknown:
            raise DataError(f"transcript {text!r} has characters {unknown} outside space and a-z")
        return np.array([3 + ALPHABET.index(c) for c in text], np.int32)

    def decode(self, ids) -> str:
        out = []
        for i in ids:
            if int(i) in (EOS, PAD):
                break
            out.append(ALPHABET[int(i) - 3] if int(i) >= 3 else "")
        return "".join(out)

    def clip(self, split: str, j: int) -> tuple[np.ndarray, str]:
        """Clip ``j`` of ``split``: ``(samples [<= clip samples], transcript)``; takes too long for the clip are redrawn."""
        rng = np.random.default_rng([self.seed, SPLIT_IDS[split], j])
        while True:
            words = draw(rng, self.max_digits)
            audio = synthesize(words, rng)
            if len(audio) <= self.samples:
                return audio, " ".join(words)

    def pool(self, split: str) -> dict[str, np.ndarray]:
        """Every clip of ``split`` as features and targets (synthesised on first use, then kept)."""
        if split not in self.SPLITS:
            raise DataError(f"split {split!r}: speech_digits has {list(self.SPLITS)}")
        if split not in self._pools:
            n, t = self.sizes[split], self.max_target
            features = np.zeros((n, self.frames, self.n_mels), np.float16)
            dec_in, targets = np.full((n, t), PAD, np.int32), np.full((n, t), PAD, np.int32)
            texts = []
            for start in range(0, n, 256):
                audio = np.zeros((min(256, n - start), self.samples), np.float32)
                for r in range(len(audio)):
                    clip, text = self.clip(split, start + r)
                    audio[r, : len(clip)] = clip
                    x, y = shift_right(self.encode(text), BOS, EOS)
                    dec_in[start + r, : len(x)], targets[start + r, : len(y)] = x, y
                    texts.append(text)
                features[start : start + len(audio)] = np.asarray(_log_mel(self.n_mels)(audio))
            self._pools[split] = {"inputs": features, "decoder_inputs": dec_in, "targets": targets,
                                  "transcripts": np.array(texts)}  # fmt: skip
        return self._pools[split]

    def transcripts(self, split: str) -> list[str]:
        return [str(t) for t in self.pool(split)["transcripts"]]

    def num_batches(self, split: str, batch_size: int | None = None) -> int:
        return -(-self.sizes[split] // (batch_size or self.batch_size))

    def read(self, split: str, index: int, b: int, rows: range) -> dict[str, np.ndarray]:
        pool, n = self.pool(split), self.sizes[split]
        idx = np.array([index * b + r for r in rows], np.int64)
        if split == "train":  # an endless stream, reshuffled every epoch
            epoch, pos = idx // n, idx % n
            order = {e: np.random.default_rng([self.seed, 11, int(e)]).permutation(n) for e in np.unique(epoch)}
            picks, weights = np.array([order[e][p] for e, p in zip(epoch, pos)], np.int64), np.ones(len(idx))
        else:  # one pass in order, padded with zero-weight rows
            picks, weights = idx % n, (idx < n).astype(np.float64)
        targets = pool["targets"][picks]
        w = (targets != PAD).astype(np.float32) * weights[:, None].astype(np.float32)
        return {"inputs": pool["inputs"][picks].astype(np.float32), "decoder_inputs": pool["decoder_inputs"][picks],
                "targets": targets, "weights": w}  # fmt: skip


__all__ = ["ALPHABET", "DIGITS", "PHONEMES", "PRONUNCIATION", "SpeechDigits", "draw", "synthesize"]
