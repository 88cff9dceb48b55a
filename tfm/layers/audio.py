"""Whisper's audio front end (Radford et al. 2022): waveform -> log-mel spectrogram, in JAX.

    audio [B, N] at 16 kHz -> reflect-pad 200 -> 25 ms Hann frames every 10 ms -> |rfft|^2
      -> drop the last frame -> mel filter bank -> log10(max(., 1e-10))
      -> max(., per-clip max - 8) -> (. + 4) / 4 -> [B, N // 160, n_mels]

The filter bank is the Slaney one (librosa's default, which Whisper ships as ``mel_filters.npz``):
triangles on the Slaney mel scale (linear below 1 kHz, logarithmic above), each scaled to unit
area (``2 / (f_right - f_left)``). Frames come first and mels last, the ``[B, T, D]`` layout of
every other input in tfm. Whisper pads every clip to 30 s before this; the dynamic-range clamp
(``max - 8``) is taken over whatever the caller passes, so pass clips padded the same way to
match it exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

SAMPLE_RATE = 16_000
N_FFT = 400  # 25 ms windows
HOP_LENGTH = 160  # 10 ms hops: 100 frames per second


def hz_to_mel(f: np.ndarray) -> np.ndarray:
    """The Slaney mel scale: 3 mels per 200 Hz up to 1 kHz, then 27 / ln(6.4) mels per e-fold."""
    f = np.asarray(f, np.float64)
    log_region = f >= 1000.0
    mel = 3.0 * f / 200.0
    return np.where(log_region, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * 27.0 / np.log(6.4), mel)


def mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (m - 15.0)), 200.0 * m / 3.0)


@functools.lru_cache(maxsize=8)
def mel_filters(n_mels: int = 80, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The Slaney-normalised mel filter bank ``[n_fft // 2 + 1, n_mels]`` (float32), 0 Hz to Nyquist."""
    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2))
    left, center, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None] - left) / (center - left)
    falling = (right - freqs[None]) / (right - center)
    weights = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (right - left))
    return weights.T.astype(np.float32)


def num_frames(num_samples: int) -> int:
    """Frames ``log_mel_spectrogram`` gives for ``num_samples`` samples: one per full hop."""
    return num_samples // HOP_LENGTH


def log_mel_spectrogram(audio: Array, n_mels: int = 80) -> Array:
    """``audio [B, N]`` (or ``[N]``) float waveform at 16 kHz -> ``[B, N // 160, n_mels]`` float32 features."""
    audio = jnp.asarray(audio, jnp.float32)
    single = audio.ndim == 1
    audio = audio[None] if single else audio
    if audio.ndim != 2:
        raise ValueError(f"audio must be [B, N] or [N] samples, got shape {audio.shape}")
    if audio.shape[1] <= N_FFT // 2:
        raise ValueError(f"audio of {audio.shape[1]} samples is too short for {N_FFT}-sample windows")
    padded = jnp.pad(audio, ((0, 0), (N_FFT // 2, N_FFT // 2)), mode="reflect")  # torch.stft(center=True)
    frames = 1 + (padded.shape[1] - N_FFT) // HOP_LENGTH
    index = np.arange(frames)[:, None] * HOP_LENGTH + np.arange(N_FFT)[None, :]
    window = 0.5 - 0.5 * jnp.cos(2.0 * jnp.pi * jnp.arange(N_FFT) / N_FFT)  # periodic Hann
    spectrum = jnp.fft.rfft(padded[:, index] * window, axis=-1)  # [B, frames, n_fft/2 + 1]
    power = jnp.square(jnp.abs(spectrum[:, :-1]))  # Whisper drops the last frame
    mel = jnp.einsum("BTF,FM->BTM", power, jnp.asarray(mel_filters(n_mels)), precision=jax.lax.Precision.HIGHEST)
    log_spec = jnp.log10(jnp.maximum(mel, 1e-10))
    log_spec = jnp.maximum(log_spec, jnp.max(log_spec, axis=(1, 2), keepdims=True) - 8.0)
    out = (log_spec + 4.0) / 4.0
    return out[0] if single else out


__all__ = ["HOP_LENGTH", "N_FFT", "SAMPLE_RATE", "hz_to_mel", "log_mel_spectrogram", "mel_filters", "mel_to_hz", "num_frames"]
