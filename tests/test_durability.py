"""Nothing lost (DESIGN 5, issue 3): real gunicorn processes, real signals, the real tiny.en model."""

from __future__ import annotations

import http.client
import json
import threading
import time
import uuid
from pathlib import Path

from tests.conftest import FIXTURES, wav_bytes
from tests.servers import free_port, start_gunicorn, stop


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


def test_registry_survives_200_uploads_and_thousands_of_polls_from_16_threads(tmp_path: Path, model_dir: Path) -> None:
    port = free_port()
    server = start_gunicorn(tmp_path, model_dir, port, MAX_WORKERS="2", MAX_QUEUED_JOBS="250")
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
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
        assert not any(thread.is_alive() for thread in threads), "clients did not finish"
        assert errors == []
        assert len(set(ids)) == 200 and polls[0] >= 2000
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("GET", "/jobs?limit=1000")
        records = json.loads(connection.getresponse().read())["jobs"]
        assert len(records) == 200
        assert {(r["status"], r["progress"], r["stage"], r["attempts"]) for r in records} == {
            ("completed", 100, "done", 1)
        }
        assert all(r["finished_at"] >= r["started_at"] >= r["created_at"] for r in records)
    finally:
        stop(server)
    log = "".join(path.read_text() for path in tmp_path.glob("gunicorn-*.log"))
    assert "database is locked" not in log and "Traceback" not in log
