"""Whisper's log-Mel spectrogram of a whole file, computed a minute at a time.

``whisper.log_mel_spectrogram`` takes the whole file as float32 and holds its STFT at once: about
4 GB for two hours. This computes the same values chunk by chunk from the decoded int16 samples,
so a job holds only the result (n_mels x 4 bytes per 10 ms: 230 MB for two hours of 80 Mels).
Whisper's transcribe loop receives it as a LogMel, which the function installed by
``accept_precomputed`` hands back unchanged (internals.py checks the loop still calls it).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import whisper
from whisper.audio import HOP_LENGTH, N_FFT, N_SAMPLES

from whisper_flask.audio.media import DecodedAudio

#: Frames computed at once: a minute (its STFT is 10 MB).
CHUNK_FRAMES = 6000
_EDGE = N_FFT // 2  # torch.stft(center=True) pads each end by this much, reflecting the signal


@dataclass(frozen=True)
class LogMel:
    """A precomputed log-Mel spectrogram, padded as whisper.transcribe pads its own (N_SAMPLES of zeros)."""

    tensor: torch.Tensor


def log_mel(audio: DecodedAudio, n_mels: int, first_samples: int | None = None) -> torch.Tensor:
    """log_mel_spectrogram(samples, n_mels, padding=N_SAMPLES) of the audio (or its first samples), by chunks."""
    samples = audio.samples if first_samples is None else min(first_samples, audio.samples)
    frames = (samples + N_SAMPLES) // HOP_LENGTH  # the padded signal's frames, its last one dropped
    window = torch.hann_window(N_FFT)
    filters = whisper.audio.mel_filters("cpu", n_mels)
    result = torch.empty(n_mels, frames)
    for first in range(0, frames, CHUNK_FRAMES):
        last = min(first + CHUNK_FRAMES, frames)
        # Frame f covers the signal's samples [f * HOP - EDGE, f * HOP + EDGE).
        signal = _padded_signal(audio, samples, first * HOP_LENGTH - _EDGE, (last - 1) * HOP_LENGTH + _EDGE)
        stft = torch.stft(torch.from_numpy(signal), N_FFT, HOP_LENGTH, window=window, center=False,
                          return_complex=True)  # fmt: skip
        result[:, first:last] = torch.clamp(filters @ (stft.abs() ** 2), min=1e-10).log10()
    # Whisper's normalisation needs the whole file's maximum, so it runs once all chunks are in.
    torch.clamp_(result, min=float(result.max()) - 8.0)
    return result.add_(4.0).div_(4.0)


def _padded_signal(audio: DecodedAudio, samples: int, start: int, stop: int) -> np.ndarray:
    """Samples [start, stop) of the audio as float32, zero past its end and reflected before its start."""
    signal = np.zeros(stop - start, np.float32)
    offset = max(start, 0) - start
    body = audio.read(max(start, 0), min(stop, samples))
    signal[offset : offset + body.size] = body / np.float32(32768.0)
    if start < 0:  # reflected: x[-k] = x[k], the first sample not repeated; past the audio, zeros
        head = audio.read(1, min(1 - start, samples))[::-1]
        signal[offset - head.size : offset] = head / np.float32(32768.0)
    return signal


_WHISPER_LOG_MEL = whisper.audio.log_mel_spectrogram


def _log_mel_or_precomputed(audio: Any, *args: Any, **kwargs: Any) -> Any:
    if isinstance(audio, LogMel):
        return audio.tensor
    return _WHISPER_LOG_MEL(audio, *args, **kwargs)


def accept_precomputed() -> None:
    """Let whisper.transcribe take a LogMel for its audio; any other audio is computed as before."""
    # whisper.transcribe is the function; its module is reached by name.
    setattr(importlib.import_module("whisper.transcribe"), "log_mel_spectrogram", _log_mel_or_precomputed)  # noqa: B010
