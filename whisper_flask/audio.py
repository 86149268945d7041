"""Decode any audio ffmpeg understands into Whisper's input: 16 kHz mono float32."""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

import numpy as np
from whisper.audio import SAMPLE_RATE

from .exceptions import AudioDecodeError


@functools.cache
def ffmpeg_binary() -> str:
    """The system ffmpeg when present, else the one shipped in the imageio-ffmpeg wheel."""
    system = shutil.which("ffmpeg")
    if system:
        return system
    import imageio_ffmpeg

    return str(imageio_ffmpeg.get_ffmpeg_exe())


def decode_audio(path: Path, max_seconds: float | None = None) -> np.ndarray:
    """Return the file's samples, or raise AudioDecodeError with ffmpeg's message."""
    cmd = [ffmpeg_binary(), "-nostdin", "-hide_banner", "-loglevel", "error", "-threads", "0", "-i", str(path)]
    if max_seconds is not None:
        cmd += ["-t", str(max_seconds)]
    cmd += ["-vn", "-f", "s16le", "-ac", "1", "-acodec", "pcm_s16le", "-ar", str(SAMPLE_RATE), "-"]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0:
        raise AudioDecodeError(_ffmpeg_reason(proc.stderr))
    if not proc.stdout:
        raise AudioDecodeError("the file contains no audio")
    return np.frombuffer(proc.stdout, np.int16).astype(np.float32) / 32768.0


#: Peak level below which a file is taken as silence (-60 dBFS): Whisper hallucinates
#: text ("you you you") on digital silence, so such files skip the model.
SILENCE_PEAK = 10 ** (-60 / 20)


def is_silent(audio: np.ndarray) -> bool:
    """True when no sample rises above -60 dBFS."""
    return float(np.max(np.abs(audio), initial=0.0)) < SILENCE_PEAK


def _ffmpeg_reason(stderr: bytes) -> str:
    lines = [line.strip() for line in stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    # ffmpeg's last lines say why; earlier ones repeat the input path.
    reason = "; ".join(lines[-2:]) if lines else "ffmpeg failed without a message"
    return f"could not decode audio: {reason}"
