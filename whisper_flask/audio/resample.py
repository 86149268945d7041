"""Streamed PCM to 16 kHz, chunk by chunk, with no seams between chunks (OpenAI's Realtime audio is 24 kHz)."""

from __future__ import annotations

from math import gcd

import numpy as np
from scipy import signal

#: Whisper's rate, and what every live stream is turned into.
TARGET_RATE = 16000
#: The low-pass filter's length per polyphase branch: 24 kHz speech keeps 7.4 kHz of its band.
TAPS_PER_PHASE = 16


class Resampler:
    """Rational resampling (up, low-pass, down) whose filter state and phase carry over from one chunk to the next."""

    def __init__(self, rate: int) -> None:
        divisor = gcd(rate, TARGET_RATE)
        self._up, self._down = TARGET_RATE // divisor, rate // divisor
        cutoff = 1 / max(self._up, self._down)
        self._taps = signal.firwin(TAPS_PER_PHASE * self._up, cutoff) * self._up
        self._state = np.zeros(len(self._taps) - 1)
        self._phase = 0  # where, in the upsampled stream, the next kept sample is

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        """The next chunk of 16 kHz float samples for the next chunk of input samples."""
        if self._up == self._down:
            return samples
        upsampled = np.zeros(len(samples) * self._up)
        upsampled[:: self._up] = samples
        filtered, self._state = signal.lfilter(self._taps, 1.0, upsampled, zi=self._state)
        kept = filtered[self._phase :: self._down]
        self._phase = (self._phase - len(upsampled)) % self._down
        return kept.astype(np.float32)
