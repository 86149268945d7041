"""Secrets and files at rest: the link secret, the modes of the service's files, the first key."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask

from tests.helpers import FakeEngine, base_config, eventually, submit, wait_for, wav_bytes
from tests.servers import AudioSite
from whisper_flask import create_app
from whisper_flask.extension import get_service
from whisper_flask.settings import ConfigError, Settings


@pytest.mark.parametrize("size", [0, 31, 33])
def test_a_link_secret_of_the_wrong_length_refuses_the_start(tmp_path: Path, size: int) -> None:
    secret = tmp_path / "transcripts" / "link-secret"
    secret.parent.mkdir()
    secret.write_bytes(b"k" * size)
    with pytest.raises(ConfigError, match=f"link-secret holds {size} bytes, not 32: delete it") as info:
        create_app(base_config(tmp_path), engine=FakeEngine())
    assert "\n" not in str(info.value) and "stops working" in str(info.value)


def test_a_link_secret_is_made_once_and_kept(tmp_path: Path) -> None:
    secrets = []
    for _ in range(2):
        get_service(create_app(base_config(tmp_path), engine=FakeEngine())).stop()
        secrets.append((tmp_path / "transcripts" / "link-secret").read_bytes())
    assert len(secrets[0]) == 32 and secrets[0] == secrets[1]


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The process's umask as `make run` has it (022), restored after the test."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def modes(*directories: Path) -> dict[str, str]:
    """Every file under `directories` (hidden ones included) and its permission bits, in octal."""
    return {
        str(path.relative_to(path.parents[1])): oct(stat.S_IMODE(path.stat().st_mode))
        for directory in directories
        for path in directory.rglob("*")
        if path.is_file()
    }


def test_every_file_the_service_makes_is_its_users_alone_under_umask_022(
    umask_022: None, make_app: Callable[..., Flask], engine: FakeEngine, tmp_path: Path, audio_site: AudioSite
) -> None:
    app = make_app(KEEP_UPLOADS=True, URL_ALLOW="127.0.0.1")
    client = app.test_client()
    directories = [tmp_path / name for name in ("transcripts", "uploads", "logs")]
    engine.gate.clear()
    running = submit(client, wav_bytes(65))
    engine.gate.let_one_through()  # past its first window: its resume state is saved
    eventually(lambda: (tmp_path / "transcripts" / f"{running}.resume.json").exists())
    held = modes(*directories)
    engine.gate.set()
    fetched = client.post("/upload", data={"url": audio_site.url("/fox.wav")}).get_json()["transcription_id"]
    assert wait_for(client, running)["status"] == wait_for(client, fetched)["status"] == "completed"
    ended = modes(*directories)
    assert f"transcripts/{running}.resume.json" in held and f"transcripts/{fetched}.txt" in ended
    assert f"uploads/{fetched}.upload" in ended, "the fetched audio is kept (KEEP_UPLOADS)"
    assert {"transcripts/jobs.sqlite3-wal", "transcripts/jobs.sqlite3-shm", "logs/whisper_flask.log"} <= set(ended)
    assert {name: mode for name, mode in {**held, **ended}.items() if mode != "0o600"} == {}


def test_only_a_first_start_makes_a_key_and_a_start_after_all_are_revoked_only_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def start() -> list[str]:
        service = get_service(create_app(base_config(tmp_path), engine=FakeEngine()))
        service.start()
        names = [key.name for key in service.keys()]
        service.stop()
        return names

    log_file = tmp_path / "logs" / "whisper_flask.log"
    assert start() == ["admin"] and "No API key existed, so an admin key was made" in caplog.text
    cli = get_service(create_app(base_config(tmp_path), engine=FakeEngine()))
    cli.revoke_key("admin")
    cli.stop()
    caplog.clear()
    logged_before = log_file.stat().st_size
    assert start() == ["admin"], "no key is made once keys have existed"
    assert "every API key is revoked" in caplog.text and "keys create" in caplog.text
    assert "wf_" not in caplog.text and "wf_" not in log_file.read_text()[logged_before:]


def test_deleting_an_ended_job_deletes_its_files_and_closes_its_links(make_app: Callable[..., Flask]) -> None:
    app = make_app(KEEP_UPLOADS=True)
    client = app.test_client()
    job_id = submit(client, wav_bytes(35))
    link = wait_for(client, job_id)["download_url"]
    uploads, transcripts = app.config["UPLOAD_DIR"], app.config["TRANSCRIPT_DIR"]
    assert list(uploads.iterdir()) and list(transcripts.glob(f"{job_id}.*"))
    deleted = client.delete(f"/jobs/{job_id}")
    assert deleted.status_code == 200 and deleted.get_json()["expired_at"] is not None
    assert "download_url" not in deleted.get_json(), "no link to what is gone"
    assert not list(uploads.iterdir()) and not list(transcripts.glob(f"{job_id}.*"))
    for answer in (client.get(link), client.get(f"/download/{job_id}.txt"), client.get(f"/progress/{job_id}")):
        assert (answer.status_code, answer.get_json()["code"]) == (410, "expired")
    again = client.delete(f"/jobs/{job_id}")
    assert again.status_code == 200 and again.get_json()["expired_at"] == deleted.get_json()["expired_at"]


def test_deleting_a_failed_job_marks_it_deleted_too(make_app: Callable[..., Flask]) -> None:
    client = make_app().test_client()
    job_id = submit(client, wav_bytes(5), initial_prompt="crash")
    assert wait_for(client, job_id)["status"] == "failed"
    assert client.delete(f"/jobs/{job_id}").status_code == 200
    assert client.get(f"/jobs/{job_id}").status_code == 410


def test_the_data_and_log_directories_the_service_makes_are_its_users_alone(umask_022: None, tmp_path: Path) -> None:
    settings = Settings.load({**base_config(tmp_path), "UPLOAD_DIR": tmp_path / "new" / "uploads"})
    made = [settings.UPLOAD_DIR, settings.TRANSCRIPT_DIR, settings.LOG_DIR, settings.MODEL_DIR]
    assert {
        str(path): oct(path.stat().st_mode & 0o777) for path in made if oct(path.stat().st_mode & 0o777) != "0o700"
    } == {}
