"""Nothing lost (DESIGN 5, issue 3): real gunicorn processes, real signals, the real tiny.en model."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, SPOKEN, StartGunicorn, wav_bytes
from tests.servers import stop
from tests.test_end_to_end import speech, split_scores


def multipart(data: bytes, filename: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def test_registry_survives_200_uploads_and_thousands_of_polls_from_16_threads(
    gunicorn: StartGunicorn, tmp_path: Path
) -> None:
    port, server = gunicorn(MAX_WORKERS="2", MAX_QUEUED_JOBS="250")
    # Every tenth upload is speech for the model; the rest are silence, which takes the whole
    # pipeline but the model, so 200 jobs fit in a test while the registry is kept busy.
    speech, silence = (FIXTURES / "fox.wav").read_bytes(), wav_bytes(1.0, amplitude=0)
    ids: list[str] = []
    errors: list[str] = []
    polls = [0]
    lock = threading.Lock()

    def client(worker: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine = []
        for n in range(200 // 16 + (worker < 200 % 16)):
            audio = speech if (worker + 16 * n) % 10 == 0 else silence
            body, content_type = multipart(audio, f"w{worker}-{n}.wav")
            connection.request("POST", "/upload", body, {"Content-Type": content_type})
            response = connection.getresponse()
            payload = json.loads(response.read())
            if response.status != 202:
                errors.append(f"upload {response.status}: {payload}")
                continue
            mine.append(payload["transcription_id"])
            for job_id in mine[-3:]:  # poll the newest few after every upload
                connection.request("GET", f"/progress/{job_id}")
                response = connection.getresponse()
                state = json.loads(response.read())
                if response.status != 200 or state["status"] not in ("pending", "in_progress", "completed"):
                    errors.append(f"poll {response.status}: {state}")
                with lock:
                    polls[0] += 1
        while mine:  # then poll everything of ours until done
            for job_id in list(mine):
                connection.request("GET", f"/progress/{job_id}")
                response = connection.getresponse()
                state = json.loads(response.read())
                with lock:
                    polls[0] += 1
                if response.status != 200:
                    errors.append(f"poll {response.status}: {state}")
                elif state["status"] == "completed":
                    mine.remove(job_id)
                    with lock:
                        ids.append(job_id)
                elif state["status"] not in ("pending", "in_progress"):
                    errors.append(f"job ended {state['status']}: {state}")
                    mine.remove(job_id)
            time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(worker,)) for worker in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not any(thread.is_alive() for thread in threads), "clients did not finish"
    assert errors == []
    assert len(set(ids)) == 200 and polls[0] >= 2000
    records = get(port, "/jobs?limit=1000")["jobs"]
    assert len(records) == 200
    assert {(r["status"], r["progress"], r["stage"], r["attempts"]) for r in records} == {("completed", 100, "done", 1)}
    assert all(r["finished_at"] >= r["started_at"] >= r["created_at"] for r in records)
    stop(server)  # a clean stop, then the log must show no locking error or traceback
    log = "".join(path.read_text() for path in tmp_path.glob("gunicorn-*.log"))
    assert "database is locked" not in log and "Traceback" not in log


def call(port: int, method: str, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request(method, path)
    response = connection.getresponse()
    return response.status, response.read()


def get(port: int, path: str) -> dict:
    return json.loads(call(port, "GET", path)[1])


def post_file(port: int, path: Path) -> tuple[int, dict]:
    body, content_type = multipart(path.read_bytes(), path.name)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", "/upload", body, {"Content-Type": content_type})
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def upload(port: int, path: Path) -> str:
    status, payload = post_file(port, path)
    assert status == 202, payload
    return str(payload["transcription_id"])


def wait_until(port: int, job_id: str, check, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = get(port, f"/jobs/{job_id}")
        if check(record):
            return record
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached the state: {record}")


def download(port: int, job_id: str, fmt: str) -> bytes:
    return call(port, "GET", f"/download/{job_id}.{fmt}")[1]


def transcribing(record: dict) -> bool:
    return record["status"] == "in_progress" and record["processed_seconds"] > 0


def finished(record: dict) -> bool:
    return record["status"] in ("completed", "failed", "cancelled")


def worker_pid(arbiter: int) -> int:
    """The gunicorn worker process of an arbiter (the process the model and jobs live in)."""
    children = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) == arbiter]
    assert len(children) == 1, children
    return children[0]


def _ppid(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_killed_service_finishes_every_job_in_order_after_restart(gunicorn: StartGunicorn, tmp_path: Path) -> None:
    names = list(SPOKEN)
    files = [speech(tmp_path / "long.wav", 90, names)] + [FIXTURES / name for name in names[:3]]
    port, server = gunicorn(MAX_WORKERS="1")
    ids = [upload(port, path) for path in files]
    wait_until(port, ids[0], transcribing)
    os.killpg(server.pid, signal.SIGKILL)  # power loss: arbiter and worker die at once
    server.wait()

    gunicorn(MAX_WORKERS="1")
    records = [wait_until(port, job_id, finished) for job_id in ids]
    assert [r["status"] for r in records] == ["completed"] * 4
    assert [r["attempts"] for r in records] == [2, 1, 1, 1]
    assert [r["transcription_id"] for r in sorted(records, key=lambda r: r["finished_at"])] == ids
    resumed = re.search(rf"job {ids[0]} resumes at ([\d.]+) s", (tmp_path / "logs" / "whisper_flask.log").read_text())
    assert resumed and float(resumed.group(1)) > 0, "the long job must resume, not start over"
    # An undisturbed run of the same files on the same service, for comparison.
    again = [upload(port, path) for path in files]
    for job_id in again:
        wait_until(port, job_id, finished)
    for disturbed, undisturbed in zip(ids, again, strict=True):
        for fmt in ("txt", "srt"):
            assert download(port, disturbed, fmt) == download(port, undisturbed, fmt)
        # Both runs batch windows with different neighbours: only the decoder's scores may move.
        got, got_scores = split_scores(download(port, disturbed, "json"))
        expected, expected_scores = split_scores(download(port, undisturbed, "json"))
        assert got == expected
        assert got_scores == pytest.approx(expected_scores, rel=1e-4, abs=1e-6)


def test_a_job_that_kills_the_worker_twice_fails_and_the_rest_are_served(
    gunicorn: StartGunicorn, tmp_path: Path
) -> None:
    port, server = gunicorn(MAX_WORKERS="1")
    poison = upload(port, speech(tmp_path / "poison.wav", 60, list(SPOKEN)))
    bystander = upload(port, FIXTURES / "garden.wav")
    for attempt in (1, 2):
        wait_until(port, poison, lambda r, a=attempt: transcribing(r) and r["attempts"] == a)
        os.kill(worker_pid(server.pid), signal.SIGKILL)  # as the OOM killer would; gunicorn respawns it
    failed = wait_until(port, poison, finished)
    assert (failed["status"], failed["error_code"], failed["attempts"]) == ("failed", "interrupted", 2)
    assert wait_until(port, bystander, finished)["status"] == "completed"
    fresh = upload(port, FIXTURES / "fox.wav")
    assert wait_until(port, fresh, finished)["status"] == "completed"
    assert b"lazy dog" in download(port, fresh, "txt").lower()


def test_finished_jobs_expire_then_are_forgotten(gunicorn: StartGunicorn, tmp_path: Path) -> None:
    seconds = 2 / 86400  # RETENTION_DAYS and EXPIRED_KEEP_DAYS of two seconds each
    port, _ = gunicorn(RETENTION_DAYS=str(seconds), EXPIRED_KEEP_DAYS=str(seconds), SWEEP_INTERVAL_S="0.2")
    job_id = upload(port, FIXTURES / "fox.wav")
    wait_until(port, job_id, finished)
    assert call(port, "GET", f"/download/{job_id}.txt")[0] == 200
    assert (tmp_path / "transcripts" / f"{job_id}.txt").is_file()
    statuses = []
    deadline = time.monotonic() + 30
    while (status := call(port, "GET", f"/progress/{job_id}"))[0] != 404 and time.monotonic() < deadline:
        statuses.append(status)
        time.sleep(0.1)
    assert status[0] == 404 and json.loads(status[1])["code"] == "job_not_found"
    gone = [json.loads(body) for code, body in statuses if code == 410]
    assert gone and gone[0]["code"] == "expired"
    assert not list((tmp_path / "transcripts").glob(f"{job_id}.*")), "expired transcripts must be deleted"


@contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """Make a directory unwritable, for root too (chattr +i), and restore it."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(directory)], check=True)
    else:
        directory.chmod(0o555)
    try:
        yield
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
        else:
            directory.chmod(0o755)


def test_unwritable_directories_fail_cleanly_and_the_service_keeps_serving(
    gunicorn: StartGunicorn, tmp_path: Path
) -> None:
    port, _ = gunicorn(MAX_WORKERS="1")
    transcripts, uploads = tmp_path / "transcripts", tmp_path / "uploads"
    job_id = upload(port, speech(tmp_path / "long.wav", 90, list(SPOKEN)))
    wait_until(port, job_id, transcribing)
    with read_only(transcripts):
        failed = wait_until(port, job_id, finished)
        assert (failed["status"], failed["error_code"]) == ("failed", "write_failed")
        assert failed["error"] == "could not write to the transcript directory: Operation not permitted"
        # No transcript and no temporary file; only the resume state saved before the directory
        # turned read-only is left, which cannot be deleted now (the retention sweep will).
        left = {p.name for p in transcripts.iterdir()} - {"jobs.sqlite3", "jobs.sqlite3-wal", "jobs.sqlite3-shm"}
        assert left <= {f"{job_id}.resume.json"}
    assert (tmp_path / "uploads").exists() and not uploads_of(tmp_path), "the failed job's audio is deleted"
    with read_only(uploads):
        status, body = post_file(port, FIXTURES / "fox.wav")
        assert (status, body["code"]) == (507, "storage_full")
    fresh = upload(port, FIXTURES / "fox.wav")
    assert wait_until(port, fresh, finished)["status"] == "completed"


def test_cancelling_running_and_pending_jobs_removes_them_and_their_files(
    gunicorn: StartGunicorn, tmp_path: Path
) -> None:
    port, _ = gunicorn(MAX_WORKERS="1")
    running = upload(port, speech(tmp_path / "long.wav", 120, list(SPOKEN)))
    pending = upload(port, FIXTURES / "fox.wav")
    wait_until(port, running, transcribing)
    for job_id in (pending, running):
        status, body = call(port, "DELETE", f"/jobs/{job_id}")
        assert (status, json.loads(body)["status"]) == (200, "cancelled")
    assert get(port, "/queue") == {"pending": 0, "in_progress": 0, "capacity": 100, "workers": 1}
    deadline = time.monotonic() + 60
    while list(uploads_of(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.1)  # the running job lets go of its audio at its next window
    assert not list(uploads_of(tmp_path))
    assert not [p for p in (tmp_path / "transcripts").iterdir() if not p.name.startswith("jobs.sqlite3")]
    status, body = call(port, "DELETE", f"/jobs/{running}")
    assert (status, json.loads(body)["status"]) == (200, "cancelled"), "repeating the call is harmless"
    fresh = upload(port, FIXTURES / "fox.wav")
    assert wait_until(port, fresh, finished)["status"] == "completed"


def uploads_of(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "uploads").glob("*.upload"))
