"""Hostile input (ARCHITECTURE.md, "Hostile input"): each attack found in the probe, reproduced small."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.helpers import (
    FIXTURES,
    SPOKEN,
    FakeEngine,
    LiveClient,
    eventually,
    speech,
    submit,
    upload,
    wait_for,
    wait_until,
    wav_bytes,
    worker_pid,
)
from tests.servers import Servers
from whisper_flask.audio import media
from whisper_flask.audio.media import MediaDecoder
from whisper_flask.audio.subprocesses import media_tool, run_bounded
from whisper_flask.exceptions import AudioDecodeError, DecodeTimeout
from whisper_flask.extension import get_service


def header_wav(sample_rate: int, data_bytes: int) -> bytes:
    """A PCM WAV whose header claims `sample_rate`, with `data_bytes` of samples."""
    fmt = struct.pack("<HHIIHH", 1, 1, sample_rate, sample_rate * 2, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", data_bytes)
    return b"RIFF" + struct.pack("<I", len(body) + data_bytes) + body + b"\x01\x02" * (data_bytes // 2)


def inputs_that_open_other_inputs(directory: Path) -> dict[str, bytes]:
    """Small files that make a demuxer open further inputs: a live playlist, playlists and a list of a secret."""
    secret = directory / "secret.wav"
    secret.write_bytes((FIXTURES / "fox.wav").read_bytes())
    return {
        "live-hls": b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nhttp://127.0.0.1:9/segment.ts\n",
        "hls-of-a-local-file": f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile://{secret}\n"
        "#EXT-X-ENDLIST\n".encode(),
        "concat-list": f"ffconcat version 1.0\nfile '{secret}'\n".encode(),
    }


class SlowFfmpeg:
    """An ffmpeg that hangs (as on a live playlist) while its marker file exists, and notes each pid."""

    def __init__(self, directory: Path) -> None:
        self.marker = directory / "hang"
        self.pid_file = directory / "pids"
        self.path = directory / "ffmpeg"
        self.path.write_text(
            f'#!/bin/sh\necho $$ >> "{self.pid_file}"\n[ -e "{self.marker}" ] && exec sleep 300\n'
            f'exec {media_tool("ffmpeg")} "$@"\n'
        )
        self.path.chmod(0o755)
        self.marker.touch()

    def pids(self) -> list[int]:
        """The pids of every run so far."""
        return [int(line) for line in self.pid_file.read_text().split()] if self.pid_file.exists() else []

    def release(self) -> None:
        """Let later runs decode normally."""
        self.marker.unlink()


def running(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def slow_ffmpeg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SlowFfmpeg:
    """Make the service's ffmpeg hang until released; ffprobe stays the real one."""
    fake = SlowFfmpeg(tmp_path)
    real = media.media_tool
    monkeypatch.setattr(media, "media_tool", lambda name: str(fake.path) if name == "ffmpeg" else real(name))
    return fake


# -- decode only real media -------------------------------------------------------------------


def test_a_header_claiming_one_sample_per_second_is_refused_at_upload(client: FlaskClient, tmp_path: Path) -> None:
    response = upload(client, header_wav(1, 20_000), filename="tiny.wav")
    assert (response.status_code, response.get_json()["code"]) == (400, "invalid_audio")
    assert "1 samples per second" in response.get_json()["error"]
    assert list((tmp_path / "uploads").iterdir()) == []


@pytest.mark.parametrize("kind", ["live-hls", "hls-of-a-local-file", "concat-list"])
@pytest.mark.parametrize("route", ["/upload", "/detect-language"])
def test_files_that_open_other_inputs_are_refused_before_decoding(
    client: FlaskClient, tmp_path: Path, kind: str, route: str
) -> None:
    payload = inputs_that_open_other_inputs(tmp_path)[kind]
    started = time.monotonic()
    response = client.post(route, data={"file": (io.BytesIO(payload), "a.mp3")})
    assert (response.status_code, response.get_json()["code"]) == (400, "invalid_audio"), response.get_json()
    assert time.monotonic() - started < 5
    assert "whitelist" in response.get_json()["error"] or "Invalid data" in response.get_json()["error"]
    assert client.get("/jobs").get_json()["jobs"] == []


def test_the_decoder_itself_refuses_a_playlist_stored_before_probing_existed(tmp_path: Path) -> None:
    playlist = tmp_path / "old.upload"
    playlist.write_bytes(inputs_that_open_other_inputs(tmp_path)["hls-of-a-local-file"])
    with pytest.raises(AudioDecodeError, match="could not decode audio") as refused:
        MediaDecoder(tmp_path, 3600).decode(playlist)
    assert str(tmp_path) not in str(refused.value)


def test_audio_longer_than_max_audio_hours_is_refused_when_probed(make_app: Callable[..., Flask]) -> None:
    client = make_app(MAX_AUDIO_HOURS=0.001).test_client()  # 3.6 s
    response = upload(client, wav_bytes(5))
    assert (response.status_code, response.get_json()["code"]) == (400, "audio_too_long")
    assert "0.001 hours" in response.get_json()["error"]


# -- bounded time -----------------------------------------------------------------------------


def test_cancelling_a_job_kills_its_decoder_at_once(client: FlaskClient, slow_ffmpeg: SlowFfmpeg) -> None:
    job_id = submit(client, wav_bytes(5))
    eventually(lambda: len(slow_ffmpeg.pids()) == 1)
    assert client.delete(f"/jobs/{job_id}").status_code == 200
    eventually(lambda: not running(slow_ffmpeg.pids()[0]), timeout=5)
    slow_ffmpeg.release()
    assert wait_for(client, submit(client, wav_bytes(5)))["status"] == "completed", "the worker is free again"


def test_stopping_the_service_kills_the_decoder_and_keeps_the_job_pending(
    app: Flask, client: FlaskClient, slow_ffmpeg: SlowFfmpeg
) -> None:
    job_id = submit(client, wav_bytes(5))
    eventually(lambda: len(slow_ffmpeg.pids()) == 1)
    get_service(app).stop()
    assert not running(slow_ffmpeg.pids()[0])
    assert get_service(app).parts.registry.view(job_id).job.status.value == "pending"


def test_a_decode_past_its_time_limit_fails_the_job_and_frees_the_worker(
    client: FlaskClient, slow_ffmpeg: SlowFfmpeg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(media, "DECODE_FIXED_S", 0.5)
    job_id = submit(client, wav_bytes(5))
    failed = wait_for(client, job_id, timeout=30)
    assert (failed["status"], failed["error_code"]) == ("failed", "decode_timeout")
    assert not running(slow_ffmpeg.pids()[0])
    # The pipeline deletes the upload just after the registry records the failure.
    eventually(lambda: list((tmp_path / "uploads").iterdir()) == [], timeout=5)
    slow_ffmpeg.release()
    assert wait_for(client, submit(client, wav_bytes(5)))["status"] == "completed"


def test_language_detection_is_bounded_in_number_and_in_time(
    make_app: Callable[..., Flask], slow_ffmpeg: SlowFfmpeg, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(media, "DECODE_FIXED_S", 2.0)
    client = make_app(MAX_DETECTIONS=1).test_client()
    answers: list[tuple[int, str]] = []

    def detect() -> None:
        response = client.post("/detect-language", data={"file": (io.BytesIO(wav_bytes(3)), "a.wav")})
        answers.append((response.status_code, response.get_json()["code"]))

    first = threading.Thread(target=detect)
    first.start()
    eventually(lambda: len(slow_ffmpeg.pids()) == 1)
    busy = client.post("/detect-language", data={"file": (io.BytesIO(wav_bytes(3)), "a.wav")})
    assert (busy.status_code, busy.get_json()["code"]) == (503, "busy") and busy.headers["Retry-After"] == "2"
    assert client.get("/healthz").status_code == 200
    first.join(10)
    assert answers == [(400, "decode_timeout")]
    assert not running(slow_ffmpeg.pids()[0])


def test_a_stopped_tool_takes_its_whole_process_group_with_it(tmp_path: Path) -> None:
    script = f"sleep 300 & echo $! > {tmp_path}/child; sleep 300"

    def stop_after_a_moment() -> None:
        if (tmp_path / "child").exists():
            raise KeyboardInterrupt

    with open(os.devnull, "wb") as sink, pytest.raises(KeyboardInterrupt):
        run_bounded(["sh", "-c", script], sink, 30, stop_after_a_moment)
    eventually(lambda: not running(int((tmp_path / "child").read_text())), timeout=5)
    with open(os.devnull, "wb") as sink, pytest.raises(DecodeTimeout):
        run_bounded(["sleep", "300"], sink, 0.3, lambda: None)


def test_a_killed_service_leaves_no_tool_running(tmp_path: Path) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", "import os, sys; from whisper_flask.audio.subprocesses import run_bounded; "
         f"run_bounded(['sh', '-c', 'echo $$ > {tmp_path}/tool; exec sleep 300'], "
         "open(os.devnull, 'wb'), 300, lambda: None)"],
        cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    eventually(lambda: (tmp_path / "tool").exists() and (tmp_path / "tool").read_text().strip() != "")
    tool = int((tmp_path / "tool").read_text())
    owner.send_signal(signal.SIGKILL)  # as the OOM killer would: no handler runs
    owner.wait(timeout=30)
    eventually(lambda: not running(tool), timeout=5)


# -- bounded memory ---------------------------------------------------------------------------


def test_ten_hours_of_silence_in_a_small_file_stays_within_memory(
    servers: Servers, tmp_path: Path, api_key: str
) -> None:
    silence = tmp_path / "ten-hours.flac"
    subprocess.run(
        [media_tool("ffmpeg"), "-v", "error", "-f", "lavfi", "-i", "anullsrc=r=8000:cl=mono", "-t", "36000",
         "-c:a", "flac", str(silence)],
        check=True,
    )  # fmt: skip
    assert silence.stat().st_size < 10_000_000
    port, server = servers.gunicorn()  # returns once the model is loaded
    client = LiveClient(port, api_key)
    worker = worker_pid(server.pid)
    before = peak_rss_mb(worker)
    job_id = submit(client, silence)
    record = wait_for(client, job_id, timeout=300)
    assert (record["status"], record["duration"]) == ("completed", 36000)
    assert client.get(f"/download/{job_id}.txt").get_data() == b""
    # Before: 6.9 GB peak (float32 samples and a pipe buffer of the whole file).
    assert peak_rss_mb(worker) - before < 300


def peak_rss_mb(pid: int) -> float:
    """A process's peak resident memory (VmHWM) in MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024


# -- names are data ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("disposition", "stored"),
    [
        ("filename*=UTF-8''evil%0D%0A2026-01-01%20INFO%20forged.wav", "evil2026-01-01 INFO forged.wav"),
        ("filename*=UTF-8''nul%00byte.wav", "nulbyte.wav"),
        ("filename*=UTF-8''invoice%E2%80%AEvaw.exe", "invoicevaw.exe"),
        ('filename="..\\\\..\\\\etc\\\\passwd.wav"', "passwd.wav"),
    ],
)
def test_file_names_lose_control_and_bidi_characters_before_storage_logs_and_headers(
    client: FlaskClient, tmp_path: Path, disposition: str, stored: str
) -> None:
    body = (
        b'--b\r\nContent-Disposition: form-data; name="file"; ' + disposition.encode() + b"\r\n"
        b"Content-Type: audio/wav\r\n\r\n" + wav_bytes(2) + b"\r\n--b--\r\n"
    )
    response = client.post("/upload", data=body, content_type="multipart/form-data; boundary=b")
    assert response.status_code == 202, response.get_json()
    job_id = response.get_json()["transcription_id"]
    assert wait_for(client, job_id)["status"] == "completed"
    assert client.get(f"/jobs/{job_id}").get_json()["filename"] == stored
    download = client.get(f"/download/{job_id}.txt")
    assert download.status_code == 200
    assert Path(stored).stem in download.headers["Content-Disposition"]
    log = (tmp_path / "logs" / "whisper_flask.log").read_text()
    assert not any(line.startswith("2026-01-01 INFO forged") for line in log.splitlines())


def test_client_text_in_log_arguments_is_escaped(app: Flask, tmp_path: Path) -> None:
    logging.getLogger("whisper_flask.test").warning("from %s", "1.2.3.4\r\nFORGED \x1b[31mred\u202e")
    log = (tmp_path / "logs" / "whisper_flask.log").read_text()
    assert "from 1.2.3.4\\r\\nFORGED \\x1b[31mred\\u202e" in log
    assert not any(line.startswith("FORGED") for line in log.splitlines())


def test_a_failed_decode_shows_no_server_path(
    app: Flask, client: FlaskClient, engine: FakeEngine, tmp_path: Path
) -> None:
    engine.gate.clear()
    holder = submit(client, wav_bytes(40))
    assert engine.in_window.wait(10)
    job_id = submit(client, wav_bytes(5))
    # The stored upload turns into garbage after its probe (as a job stored by an older version).
    upload_name = get_service(app).parts.registry.view(job_id).job.upload_name
    (tmp_path / "uploads" / upload_name).write_bytes(b"garbage " * 100)
    engine.gate.set()
    failed = wait_for(client, job_id)
    assert (failed["status"], failed["error_code"]) == ("failed", "invalid_audio")
    assert str(tmp_path) not in failed["error"] and ".upload" not in failed["error"]
    assert wait_for(client, holder)["status"] == "completed"


# -- nothing left behind ----------------------------------------------------------------------


def test_an_upload_killed_mid_stream_leaves_no_file(servers: Servers, tmp_path: Path, api_key: str) -> None:
    port, server = servers.gunicorn()
    head = (
        f"POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {api_key}\r\nContent-Length: 40000000\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n"
        'Content-Disposition: form-data; name="file"; filename="big.wav"\r\n\r\n'
    )
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(head.encode() + wav_bytes(2) + b"\0" * 10_000_000)
        time.sleep(0.5)
        os.killpg(server.pid, signal.SIGKILL)  # power loss mid-upload
        server.wait(timeout=30)
    assert [p.name for p in (tmp_path / "uploads").iterdir()] == []


def test_an_endless_chunked_raw_body_stops_at_the_upload_limit(servers: Servers, tmp_path: Path, api_key: str) -> None:
    port, _ = servers.gunicorn(MAX_UPLOAD_MB="1")
    head = (
        f"POST /upload?filename=endless.wav HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {api_key}\r\n"
        "Content-Type: audio/wav\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"10000\r\n" + bytes(0x10000) + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(head.encode())
        with contextlib.suppress(OSError):  # the server answers and closes long before the 10 MB end
            for _ in range(160):
                connection.sendall(chunk)
        response = connection.recv(65536)
    assert response.startswith(b"HTTP/1.1 413") and b'"too_large"' in response
    assert [p.name for p in (tmp_path / "uploads").iterdir()] == []


def test_stale_partial_uploads_go_at_start_and_at_each_sweep(make_app: Callable[..., Flask], tmp_path: Path) -> None:
    uploads = tmp_path / "uploads"
    uploads.mkdir(exist_ok=True)
    stale, streaming = uploads / ".incoming-old", uploads / ".incoming-now"
    for path in (stale, streaming):
        path.write_bytes(b"partial")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    app = make_app()
    assert not stale.exists() and streaming.exists(), "an upload still streaming is kept"
    os.utime(streaming, (time.time() - 3600, time.time() - 3600))
    get_service(app).parts.retention.sweep()
    assert not streaming.exists()


def test_a_crash_charges_only_the_job_that_ran_alone_into_it(servers: Servers, tmp_path: Path, api_key: str) -> None:
    """The probe's row: a bystander beside a poison job was charged too."""
    port, server = servers.gunicorn(MAX_WORKERS="2")
    client = LiveClient(port, api_key)
    long_speech = speech(tmp_path / "long.wav", 90, list(SPOKEN))
    poison, bystander = submit(client, long_speech), submit(client, long_speech)
    for job_id in (poison, bystander):
        wait_until(client, job_id, lambda r: r["status"] == "in_progress" and r["stage"] == "transcribing")
    os.kill(worker_pid(server.pid), signal.SIGKILL)  # both were transcribing: neither is charged
    for attempt in (1, 2):  # the poison now runs alone, and each crash is its own
        wait_until(client, poison, lambda r, a=attempt: r["status"] == "in_progress" and r["attempts"] == a
                   and r["stage"] == "transcribing")  # fmt: skip
        # Both are suspects after the first crash, and either may run first: never side by side.
        assert client.get(f"/jobs/{bystander}").get_json()["status"] != "in_progress", "nothing runs beside a suspect"
        os.kill(worker_pid(server.pid), signal.SIGKILL)
    failed = wait_for(client, poison)
    assert (failed["status"], failed["error_code"], failed["attempts"]) == ("failed", "interrupted", 2)
    done = wait_for(client, bystander)
    assert (done["status"], done["attempts"]) == ("completed", 1)
