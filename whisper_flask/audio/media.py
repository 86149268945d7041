"""Probe and decode uploaded media with ffprobe and ffmpeg, bounded in formats, time, length and memory.

An upload is hostile until probed (ARCHITECTURE.md, "Hostile input"): both tools read only the
stored file itself (no protocol but `file`), through an allow-list of demuxers of audio and video
containers, so playlists, concat lists and other formats that open further inputs are refused
before anything is decoded. Decoded samples go to an unnamed file on disk, never to memory.
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np
from whisper.audio import SAMPLE_RATE

from whisper_flask.audio.subprocesses import media_tool, run_bounded
from whisper_flask.exceptions import AudioDecodeError, AudioTooLong, DecodeTimeout, StorageFull, scrub_paths

#: Demuxers of self-contained audio and video containers. Deliberately absent: hls, dash, concat,
#: image2, tee, data and every other format that reads inputs named inside the file.
MEDIA_FORMATS = (
    "3g2,3gp,aac,ac3,aiff,amr,amrnb,amrwb,ape,asf,au,avi,caf,dts,eac3,flac,flv,gsm,m4a,matroska,mj2,"
    "mov,mp3,mp4,mpc,mpc8,mpeg,mpegts,ogg,tta,voc,w64,wav,webm,wv"
)
#: Below this a header is absurd: 1 Hz made a 20 KB WAV decode to 5.5 hours of samples.
MIN_SAMPLE_RATE = 1000
PROBE_TIMEOUT_S = 10.0
#: A decode may take this long plus DECODE_S_PER_AUDIO_S per second of audio. ffmpeg decoded
#: and resampled 1 h of MP3 in 2 s on an idle 2-core VM (bench/memory.py); 0.05 (3 min an hour)
#: leaves room for a machine busy with the model and for slower codecs.
DECODE_FIXED_S = 30.0
DECODE_S_PER_AUDIO_S = 0.05
#: Samples read per chunk when scanning decoded audio (1 MB of int16).
CHUNK_SAMPLES = 1 << 19
#: Peak level below which a file is taken as silence (-60 dBFS): Whisper hallucinates
#: text ("you you you") on digital silence, so such files skip the model.
SILENCE_PEAK = 32768 * 10 ** (-60 / 20)

#: Called while a tool runs; it raises to stop it (a cancelled job, a stopping service).
StopCheck = Callable[[], None]


def _never() -> None:
    """A StopCheck for callers that only need the timeout."""


@dataclass(frozen=True)
class MediaInfo:
    """What ffprobe found in a file: its container and its first audio stream."""

    format_name: str
    sample_rate: int
    duration: float | None  # None when the container does not say (e.g. a browser's MediaRecorder WebM)


class DecodedAudio:
    """16 kHz mono int16 samples in an unnamed file in UPLOAD_DIR; read by chunks, freed on close()."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self.samples = os.fstat(file.fileno()).st_size // 2

    @property
    def duration(self) -> float:
        """Seconds of audio."""
        return round(self.samples / SAMPLE_RATE, 3)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Samples [start, stop) as int16, clipped to the audio (pread: safe from several threads)."""
        start, stop = max(0, start), min(stop, self.samples)
        if stop <= start:
            return np.zeros(0, np.int16)
        return np.frombuffer(os.pread(self._file.fileno(), 2 * (stop - start), 2 * start), np.int16)

    def is_silent(self) -> bool:
        """True when no sample rises above -60 dBFS."""
        for start in range(0, self.samples, CHUNK_SAMPLES):
            chunk = self.read(start, start + CHUNK_SAMPLES).astype(np.int32)  # abs(-32768) needs 32 bits
            if chunk.size and int(np.abs(chunk).max()) >= SILENCE_PEAK:
                return False
        return True

    def close(self) -> None:
        """Free the samples' disk space."""
        self._file.close()

    def __enter__(self) -> DecodedAudio:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class MediaDecoder:
    """Probes and decodes stored uploads into DecodedAudio, refusing what is not plain media."""

    def __init__(self, work_dir: Path, max_seconds: float) -> None:
        self._work_dir = work_dir
        self.max_seconds = max_seconds

    def probe(self, path: Path, check: StopCheck = _never) -> MediaInfo:
        """The file's container, sample rate and duration; AudioDecodeError or AudioTooLong if refused."""
        with tempfile.TemporaryFile(dir=self._work_dir) as out:
            result = run_bounded(
                [media_tool("ffprobe"), "-v", "error", *_input(path),
                 "-show_entries", "format=format_name,duration:stream=codec_type,sample_rate,duration", "-of", "json"],
                out, PROBE_TIMEOUT_S, check,
            )  # fmt: skip
            out.seek(0)
            report = out.read(1 << 20)
        if result.returncode != 0:
            raise AudioDecodeError(_reason(result.text, path))
        return self._media_info(report)

    def decode(
        self, path: Path, check: StopCheck = _never, duration: float | None = None, first_seconds: float | None = None
    ) -> DecodedAudio:
        """Decode a probed file (or its first seconds) to 16 kHz mono int16 on disk.

        `duration` is what probe() found (None: unknown); it sets the time limit. The decoder keeps
        the same allow-lists as the probe, so a file never probed is refused just the same.
        """
        limit = min(self.max_seconds, first_seconds or math.inf)
        timeout = DECODE_FIXED_S + DECODE_S_PER_AUDIO_S * min(limit, duration or math.inf)
        # Unnamed (O_TMPFILE where the filesystem has it): a killed process leaves nothing behind.
        out = tempfile.TemporaryFile(dir=self._work_dir)
        try:
            # -t caps the output even if the header lied about the duration.
            result = run_bounded(
                [media_tool("ffmpeg"), "-nostdin", "-hide_banner", "-loglevel", "error", "-threads", "0",
                 *_input(path), "-t", f"{limit:.3f}", "-vn", "-ac", "1", "-ar", str(SAMPLE_RATE),
                 "-f", "s16le", "-acodec", "pcm_s16le", "-"],
                out, timeout, check,
            )  # fmt: skip
            if result.returncode != 0:
                if any(os.strerror(code) in result.text for code in (errno.ENOSPC, errno.EDQUOT)):
                    # The upload directory is full, not the file bad: the job waits for space.
                    raise StorageFull("the upload directory is full; the audio could not be decoded")
                raise AudioDecodeError(_reason(result.text, path))
            audio = DecodedAudio(out)
            if audio.samples == 0:
                raise AudioDecodeError("the file contains no audio")
            return audio
        except DecodeTimeout as exc:
            out.close()
            raise DecodeTimeout(f"decoding took longer than {timeout:.0f} s; the file is refused") from exc
        except BaseException:
            out.close()
            raise

    def _media_info(self, report: bytes) -> MediaInfo:
        try:
            parsed: dict[str, Any] = json.loads(report)
            streams = [s for s in parsed.get("streams", []) if s.get("codec_type") == "audio"]
            container = parsed["format"]
        except (ValueError, KeyError, AttributeError):
            raise AudioDecodeError("could not decode audio: the file is not a media file") from None
        if not streams:
            raise AudioDecodeError("the file contains no audio stream")
        rate = _number(streams[0].get("sample_rate")) or 0
        if rate < MIN_SAMPLE_RATE:
            raise AudioDecodeError(f"the audio's header says {rate:g} samples per second; that is not audio")
        duration = _number(container.get("duration")) or _number(streams[0].get("duration"))
        if duration is not None and duration > self.max_seconds:
            raise AudioTooLong(
                f"the audio lasts {duration / 3600:.1f} hours; the limit is {self.max_seconds / 3600:g} hours"
            )
        return MediaInfo(str(container.get("format_name", "")), int(rate), duration)


def _input(path: Path) -> list[str]:
    # The whitelists apply to every input a demuxer opens, nested ones included.
    return ["-protocol_whitelist", "file", "-format_whitelist", MEDIA_FORMATS, "-i", f"file:{path}"]


def _number(value: object) -> float | None:
    try:
        number = float(str(value))
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _reason(stderr: str, path: Path) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    # ffmpeg's last lines say why; they name the input by its server path, which no client may see.
    reason = "; ".join(lines[-2:]) if lines else "ffmpeg failed without a message"
    reason = reason.replace(f"file:{path}", "the file").replace(str(path), "the file")
    return f"could not decode audio: {scrub_paths(reason)}"
