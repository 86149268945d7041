"""Run ffmpeg and ffprobe so that none can hang a thread or outlive its owner.

Each tool runs in a session (process group) of its own, with a deadline, and is polled: when
its owner's check raises (a cancelled job, a stopping service) or the deadline passes, the whole
group gets SIGTERM, then SIGKILL after a grace period. Where util-linux's `setpriv` exists, the
tool also gets SIGKILL when the service process dies, so a killed worker leaves no orphans.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from whisper_flask.exceptions import DecodeTimeout

POLL_S = 0.1
KILL_GRACE_S = 2.0
#: stderr kept for the error message: ffmpeg's reason is in its last lines.
STDERR_TAIL = 4096


@dataclass(frozen=True)
class ToolResult:
    """How a tool ended: its exit status and the tail of its stderr."""

    returncode: int
    text: str


class MediaToolMissing(RuntimeError):
    """ffmpeg or ffprobe is not installed; the service cannot start without them."""


@functools.cache
def media_tool(name: str) -> str:
    """The path of the system's ffmpeg or ffprobe (deploy/system-packages.sh installs both)."""
    path = shutil.which(name)
    if path is None:
        raise MediaToolMissing(f"{name} is not installed; install the ffmpeg package (deploy/system-packages.sh)")
    return path


@functools.cache
def death_signal_prefix() -> tuple[str, ...]:
    """setpriv's prefix that has the tool killed when this process dies, where util-linux is installed."""
    setpriv = shutil.which("setpriv")
    return (setpriv, "--pdeathsig", "KILL", "--") if setpriv else ()


def run_bounded(command: list[str], stdout: IO[bytes], timeout: float, check: Callable[[], None]) -> ToolResult:
    """Run a tool to its end; DecodeTimeout past `timeout` s; whatever `check` raises stops it first."""
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(
            [*death_signal_prefix(), *command],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,  # its own process group, so the kill reaches anything it starts
        )
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    returncode = process.wait(POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if time.monotonic() > deadline:
                    raise DecodeTimeout(f"{os.path.basename(command[0])} ran past its {timeout:.0f} s limit")
                check()
        finally:
            if process.returncode is None:
                kill_group(process)
        size = stderr.seek(0, os.SEEK_END)
        stderr.seek(max(0, size - STDERR_TAIL))
        return ToolResult(returncode, stderr.read().decode("utf-8", "replace"))


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the tool's group, SIGKILL it after the grace period, and reap it."""
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue
