"""Nothing lost (ARCHITECTURE.md, "Durability"): real gunicorn processes, real signals, the real tiny.en model."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers import (
    FIXTURES,
    SPOKEN,
    LiveClient,
    assert_same_json_transcript,
    eventually,
    speech,
    submit,
    transcribing,
    transcripts,
    upload,
    wait_for,
    wait_until,
    wav_bytes,
    worker_pid,
)
from tests.servers import Servers

#: The service's own files in TRANSCRIPT_DIR, beside the jobs' files.
SERVICE_FILES = {"jobs.sqlite3", "jobs.sqlite3-wal", "jobs.sqlite3-shm", "link-secret"}


@pytest.mark.timeout(1200)  # its clients alone may take 600 s on a loaded machine, after the model's load
def test_registry_survives_200_uploads_and_thousands_of_polls_from_16_threads(
    servers: Servers, tmp_path: Path, api_key: str
) -> None:
    port, server = servers.gunicorn(MAX_WORKERS="2", MAX_QUEUED_JOBS="250", MAX_JOBS_PER_KEY="250")
    # Every tenth upload is speech for the model; the rest are silence, which takes the whole
    # pipeline but the model, so 200 jobs fit in a test while the registry is kept busy.
    spoken, silence = (FIXTURES / "fox.wav").read_bytes(), wav_bytes(1.0, amplitude=0)
    ids: list[str] = []
    errors: list[str] = []
    polls = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + 600  # as the join below: a client past it gives up and says so

    def poller(worker: int) -> None:
        live = LiveClient(port, api_key)
        mine = []
        for n in range(200 // 16 + (worker < 200 % 16)):
            audio = spoken if (worker + 16 * n) % 10 == 0 else silence
            response = upload(live, audio, filename=f"w{worker}-{n}.wav")
            if response.status_code != 202:
                errors.append(f"upload {response.status_code}: {response.get_json()}")
                continue
            mine.append(response.get_json()["transcription_id"])
            for job_id in mine[-3:]:  # poll the newest few after every upload
                response = live.get(f"/progress/{job_id}")
                state = response.get_json()
                if response.status_code != 200 or state["status"] not in ("pending", "in_progress", "completed"):
                    errors.append(f"poll {response.status_code}: {state}")
                with lock:
                    polls[0] += 1
        while mine and time.monotonic() < deadline:  # then poll everything of ours until done
            for job_id in list(mine):
                response = live.get(f"/progress/{job_id}")
                state = response.get_json()
                with lock:
                    polls[0] += 1
                if response.status_code != 200:
                    errors.append(f"poll {response.status_code}: {state}")
                elif state["status"] == "completed":
                    mine.remove(job_id)
                    with lock:
                        ids.append(job_id)
                elif state["status"] not in ("pending", "in_progress"):
                    errors.append(f"job ended {state['status']}: {state}")
                    mine.remove(job_id)
            time.sleep(0.05)
        if mine:
            errors.append(f"jobs not completed within 600 s: {mine}")

    # Daemons: a client still polling after a failure must not keep pytest from exiting.
    threads = [threading.Thread(target=poller, args=(worker,), daemon=True) for worker in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not any(thread.is_alive() for thread in threads), "clients did not finish"
    assert errors == []
    assert len(set(ids)) == 200 and polls[0] >= 2000
    records = LiveClient(port, api_key).get("/jobs?limit=1000").get_json()["jobs"]
    assert len(records) == 200
    assert {(r["status"], r["progress"], r["stage"], r["attempts"]) for r in records} == {("completed", 100, "done", 1)}
    assert all(r["finished_at"] >= r["started_at"] >= r["created_at"] for r in records)
    servers.stop(server)  # a clean stop, then the log must show no locking error or traceback
    log = "".join(path.read_text() for path in tmp_path.glob("gunicorn-*.log"))
    assert "database is locked" not in log and "Traceback" not in log


def test_killed_service_finishes_every_job_in_order_after_restart(
    servers: Servers, tmp_path: Path, api_key: str
) -> None:
    names = list(SPOKEN)
    files = [speech(tmp_path / "long.wav", 90, names)] + [FIXTURES / name for name in names[:3]]
    port, server = servers.gunicorn(MAX_WORKERS="1")
    client = LiveClient(port, api_key)
    ids = [submit(client, path) for path in files]
    wait_until(client, ids[0], transcribing)
    os.killpg(server.pid, signal.SIGKILL)  # power loss: arbiter and worker die at once
    server.wait(timeout=30)

    servers.gunicorn(MAX_WORKERS="1")
    records = [wait_for(client, job_id) for job_id in ids]
    assert [r["status"] for r in records] == ["completed"] * 4
    assert [r["attempts"] for r in records] == [2, 1, 1, 1]
    assert [r["transcription_id"] for r in sorted(records, key=lambda r: r["finished_at"])] == ids
    resumed = re.search(rf"job {ids[0]} resumes at ([\d.]+) s", (tmp_path / "logs" / "whisper_flask.log").read_text())
    assert resumed and float(resumed.group(1)) > 0, "the long job must resume, not start over"
    # An undisturbed run of the same files on the same service, for comparison.
    again = [submit(client, path) for path in files]
    for job_id in again:
        wait_for(client, job_id)
    for disturbed, undisturbed in zip(ids, again, strict=True):
        got_files, expected_files = transcripts(client, disturbed), transcripts(client, undisturbed)
        for fmt in ("txt", "srt"):
            assert got_files[fmt] == expected_files[fmt]
        # Both runs batch windows with different neighbours: only the decoder's scores may move.
        assert_same_json_transcript(got_files["json"], expected_files["json"])


def test_a_job_that_kills_the_worker_twice_fails_and_the_rest_are_served(
    servers: Servers, tmp_path: Path, api_key: str
) -> None:
    port, server = servers.gunicorn(MAX_WORKERS="1")
    client = LiveClient(port, api_key)
    poison = submit(client, speech(tmp_path / "poison.wav", 60, list(SPOKEN)))
    bystander = submit(client, FIXTURES / "garden.wav")
    for attempt in (1, 2):
        wait_until(client, poison, lambda r, a=attempt: transcribing(r) and r["attempts"] == a)
        os.kill(worker_pid(server.pid), signal.SIGKILL)  # as the OOM killer would; gunicorn respawns it
    failed = wait_for(client, poison)
    assert (failed["status"], failed["error_code"], failed["attempts"]) == ("failed", "interrupted", 2)
    assert wait_for(client, bystander)["status"] == "completed"
    fresh = submit(client, FIXTURES / "fox.wav")
    assert wait_for(client, fresh)["status"] == "completed"
    assert b"lazy dog" in client.get(f"/download/{fresh}.txt").get_data().lower()


def test_finished_jobs_expire_then_are_forgotten(servers: Servers, tmp_path: Path, api_key: str) -> None:
    seconds = 5 / 86400  # RETENTION_DAYS and EXPIRED_KEEP_DAYS of five seconds each: room for a loaded VM
    port, _ = servers.gunicorn(RETENTION_DAYS=str(seconds), EXPIRED_KEEP_DAYS=str(seconds), SWEEP_INTERVAL_S="0.2")
    client = LiveClient(port, api_key)
    job_id = submit(client, FIXTURES / "fox.wav")
    wait_for(client, job_id)
    assert client.get(f"/download/{job_id}.txt").status_code == 200
    assert (tmp_path / "transcripts" / f"{job_id}.txt").is_file()
    statuses = []
    deadline = time.monotonic() + 30
    while (response := client.get(f"/progress/{job_id}")).status_code != 404 and time.monotonic() < deadline:
        statuses.append(response)
        time.sleep(0.1)
    assert response.status_code == 404, f"the job was not forgotten within 30 s: {response.get_json()}"
    assert response.get_json()["code"] == "job_not_found"
    gone = [answer.get_json() for answer in statuses if answer.status_code == 410]
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
    servers: Servers, tmp_path: Path, api_key: str
) -> None:
    port, _ = servers.gunicorn(MAX_WORKERS="1")
    client = LiveClient(port, api_key)
    transcripts, uploads = tmp_path / "transcripts", tmp_path / "uploads"
    job_id = submit(client, speech(tmp_path / "long.wav", 90, list(SPOKEN)))
    wait_until(client, job_id, transcribing)
    with read_only(transcripts):
        failed = wait_for(client, job_id)
        assert (failed["status"], failed["error_code"]) == ("failed", "write_failed")
        assert failed["error"] == "could not write to the transcript directory: Operation not permitted"
        # No transcript and no temporary file; only the resume state saved before the directory
        # turned read-only is left, which cannot be deleted now (the retention sweep will).
        left = {p.name for p in transcripts.iterdir()} - SERVICE_FILES
        assert left <= {f"{job_id}.resume.json"}
    assert uploads.is_dir()
    eventually(lambda: not uploads_of(tmp_path), timeout=10)  # deleted just after the job's end is recorded
    with read_only(uploads):
        response = upload(client, FIXTURES / "fox.wav")
        assert (response.status_code, response.get_json()["code"]) == (507, "storage_full")
    fresh = submit(client, FIXTURES / "fox.wav")
    assert wait_for(client, fresh)["status"] == "completed"


def test_cancelling_running_and_pending_jobs_removes_them_and_their_files(
    servers: Servers, tmp_path: Path, api_key: str
) -> None:
    port, _ = servers.gunicorn(MAX_WORKERS="1")
    client = LiveClient(port, api_key)
    running = submit(client, speech(tmp_path / "long.wav", 120, list(SPOKEN)))
    pending = submit(client, FIXTURES / "fox.wav")
    wait_until(client, running, transcribing)
    for job_id in (pending, running):
        response = client.delete(f"/jobs/{job_id}")
        assert (response.status_code, response.get_json()["status"]) == (200, "cancelled")
    assert (
        client.get("/queue").get_json().items()
        >= {"pending": 0, "in_progress": 0, "capacity": 100, "workers": 1}.items()
    )
    eventually(lambda: not uploads_of(tmp_path))  # the running job lets go of its audio at its next window
    assert {p.name for p in (tmp_path / "transcripts").iterdir()} <= SERVICE_FILES
    response = client.delete(f"/jobs/{running}")
    assert (response.status_code, response.get_json()["status"]) == (200, "cancelled"), "repeating is harmless"
    fresh = submit(client, FIXTURES / "fox.wav")
    assert wait_for(client, fresh)["status"] == "completed"


def uploads_of(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "uploads").glob("*.upload"))
