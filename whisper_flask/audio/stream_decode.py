"""A browser's MediaRecorder stream (WebM/Opus) decoded to 16 kHz PCM16 by one ffmpeg process as it arrives.

The process reads the stream on stdin and writes PCM to stdout, drained by a thread of the decoder's own;
its owner (a live session) takes the PCM after each write, ends it with finish() or stop(), and the process
gets SIGKILL if the service dies (subprocesses.py). ffmpeg is told not to probe ahead or hold packets back,
so a frame's audio comes out as soon as its Opus packets are in (ARCHITECTURE.md, "Live transcription").
"""

from __future__ import annotations

import enum
import logging
import os
import subprocess
import threading

from whisper_flask.audio.subprocesses import death_signal_prefix, kill_group, media_tool
from whisper_flask.exceptions import InvalidAudio

log = logging.getLogger(__name__)

#: Seconds finish() waits for ffmpeg to decode the last frames and exit.
FINISH_S = 5.0
#: Decoded PCM not yet taken, at most (a minute at 16 kHz): a tiny stream may claim hours of audio.
MAX_PENDING_BYTES = 60 * 16000 * 2
#: Stream bytes by which ffmpeg must have decoded some audio: a MediaRecorder's first audio is within its first
#: few kilobytes, but some garbage after a WebM header keeps ffmpeg reading, past a megabyte, without an error or
#: a sample (5 of 200 random 48 KB streams after the header were still being read).
MAX_BYTES_BEFORE_AUDIO = 64 * 1024
#: The first bytes of every WebM stream (its EBML header): anything else is refused before ffmpeg sees more.
EBML_MAGIC = b"\x1a\x45\xdf\xa3"
_NOT_WEBM = "this is not WebM/Opus audio that can be decoded (a browser's MediaRecorder with audio/webm)"


class LiveAudioFormat(enum.Enum):
    """What a live client's binary frames hold."""

    PCM16 = "pcm16"  # raw 16-bit little-endian mono PCM
    WEBM = "webm"  # a MediaRecorder stream, audio/webm;codecs=opus


class WebmDecoder:
    """One ffmpeg process turning a WebM/Opus stream into 16 kHz PCM16, fed and drained as it arrives."""

    def __init__(self) -> None:
        command = [
            media_tool("ffmpeg"), "-hide_banner", "-loglevel", "error", "-nostats",
            "-fflags", "nobuffer", "-probesize", "4096", "-analyzeduration", "0", "-f", "matroska", "-i", "pipe:0",
            "-vn", "-ac", "1", "-ar", "16000", "-f", "s16le", "-flush_packets", "1", "pipe:1",
        ]  # fmt: skip
        self._process = subprocess.Popen(
            [*death_signal_prefix(), *command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # its messages quote the client's bytes: never logged or sent back
            start_new_session=True,
        )
        self._lock = threading.Lock()
        self._pending = bytearray()  # decoded, not yet taken (guarded by _lock)
        self._overflow = False
        self._decoded = False  # ffmpeg has written PCM (guarded by _lock)
        self._written = 0  # stream bytes sent to ffmpeg
        self._head = b""  # the stream's first bytes, up to the length of EBML_MAGIC
        self._reader = threading.Thread(target=self._drain, name="webm-decoder", daemon=True)
        self._reader.start()

    def write(self, data: bytes) -> bytes:
        """Send part of the stream; the PCM decoded so far. InvalidAudio once ffmpeg refuses the stream."""
        assert self._process.stdin is not None
        if len(self._head) < len(EBML_MAGIC):
            self._head += data[: len(EBML_MAGIC) - len(self._head)]
            if not EBML_MAGIC.startswith(self._head):
                raise InvalidAudio(_NOT_WEBM)
        try:
            self._process.stdin.write(data)
            self._process.stdin.flush()
        except (BrokenPipeError, ValueError):
            raise InvalidAudio(_NOT_WEBM) from None
        self._written += len(data)
        return self._take()

    def finish(self) -> bytes:
        """End the stream: the PCM of its last frames. InvalidAudio if ffmpeg could not decode it."""
        assert self._process.stdin is not None
        try:
            self._process.stdin.close()
            returncode = self._process.wait(FINISH_S)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            returncode = None
        self.stop()
        if returncode != 0:
            log.info("ffmpeg ended a WebM stream with exit status %s", returncode)
            raise InvalidAudio(_NOT_WEBM)
        return self._take()

    def stop(self) -> None:
        """Kill ffmpeg if it still runs and wait for the reader (idempotent)."""
        if self._process.returncode is None and self._process.poll() is None:
            kill_group(self._process)
        if self._process.stdin is not None and not self._process.stdin.closed:
            try:
                self._process.stdin.close()
            except BrokenPipeError:
                pass
        self._reader.join()

    def _take(self) -> bytes:
        """The whole samples decoded since the last take (an odd byte waits for its pair)."""
        with self._lock:
            if self._overflow:
                raise InvalidAudio("the stream decodes to far more audio than it could have taken to speak")
            whole = len(self._pending) // 2 * 2
            taken = bytes(self._pending[:whole])
            del self._pending[:whole]
            decoded = self._decoded
        if self._process.poll() not in (None, 0) or (not decoded and self._written > MAX_BYTES_BEFORE_AUDIO):
            raise InvalidAudio(_NOT_WEBM)
        return taken

    def _drain(self) -> None:
        assert self._process.stdout is not None
        fd = self._process.stdout.fileno()
        while chunk := os.read(fd, 65536):
            with self._lock:
                if len(self._pending) + len(chunk) > MAX_PENDING_BYTES:
                    self._overflow = True
                    break
                self._pending += chunk
                self._decoded = True
        if self._overflow:
            kill_group(self._process)
        self._process.stdout.close()
