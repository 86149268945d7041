"""Audio from a URL: fetched in the pipeline from real HTTP servers on loopback, every address checked."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from tests.helpers import FIXTURES, eventually, wait_for, wait_until
from tests.servers import AudioSite
from whisper_flask.audio.fetch import refusal
from whisper_flask.settings import parse_networks

LOOPBACK_ONLY = "127.0.0.1/32"  # 127.0.0.2 stays refused: the private target of a redirect


@pytest.fixture
def client(make_app: Callable[..., Flask]) -> Any:
    """A client of an app that may fetch from 127.0.0.1 only, 1 MB within 3 s."""
    return make_app(URL_ALLOW=LOOPBACK_ONLY, MAX_UPLOAD_MB=1, URL_FETCH_TIMEOUT_S=3).test_client()


def test_a_url_job_is_accepted_at_once_then_fetched_and_transcribed(client: Any, audio_site: AudioSite) -> None:
    response = client.post("/upload", data={"url": audio_site.url("/redirect"), "language": "en"})
    assert response.status_code == 202
    assert response.get_json()["stage"] == "queued"
    record = wait_for(client, response.get_json()["transcription_id"])
    assert record["status"] == "completed", record
    assert (record["filename"], record["source_url"], record["options"]) == (
        "redirect",
        audio_site.url("/redirect"),
        {"language": "en"},
    )
    assert record["duration"] == pytest.approx(4.0, abs=1)
    assert audio_site.requests == ["/redirect", "/fox.wav"]


def test_a_json_body_names_the_url_and_the_options(client: Any, audio_site: AudioSite) -> None:
    body = {"url": audio_site.url("/fox.wav"), "language": "en", "word_timestamps": True, "temperature": 0}
    response = client.post("/upload", json=body)
    assert response.status_code == 202, response.get_json()
    record = wait_for(client, response.get_json()["transcription_id"])
    assert record["status"] == "completed" and record["filename"] == "fox.wav"
    assert record["options"] == {"language": "en", "word_timestamps": True, "temperature": 0.0}


@pytest.mark.parametrize(
    ("path", "code", "reason"),
    [
        ("/missing", "fetch_failed", "the server answered 404 Not Found"),
        ("/redirect-private", "fetch_failed", "127.0.0.2 is not a public address"),
        ("/endless", "fetch_failed", "larger than the 1 MB upload limit"),
        ("/slow", "fetch_failed", "took longer than 3 s"),
        ("/continue-forever", "fetch_failed", "could not reach 127.0.0.1"),
        ("/stall", "fetch_failed", "took longer than 3 s"),  # the deadline, not the 30 s read timeout
        ("/page.html", "invalid_audio", ""),
    ],
)
def test_a_fetch_that_cannot_give_audio_fails_the_job_with_its_reason(
    client: Any, audio_site: AudioSite, path: str, code: str, reason: str
) -> None:
    job_id = client.post("/upload", data={"url": audio_site.url(path)}).get_json()["transcription_id"]
    record = wait_for(client, job_id, timeout=30)
    assert (record["status"], record["error_code"]) == ("failed", code), record
    assert reason in record["error"]
    assert not list((client.application.config["UPLOAD_DIR"]).iterdir()), "no partial download is left"


def test_loopback_is_refused_unless_url_allow_names_it(make_app: Callable[..., Flask], audio_site: AudioSite) -> None:
    client = make_app().test_client()
    job_id = client.post("/upload", data={"url": audio_site.url("/fox.wav")}).get_json()["transcription_id"]
    record = wait_for(client, job_id)
    assert record["error_code"] == "fetch_failed"
    assert "127.0.0.1 is not a public address (URL_ALLOW lists the exceptions)" in record["error"]
    assert audio_site.requests == [], "nothing was sent to the refused address"


def test_cancelling_a_job_stops_its_download(make_app: Callable[..., Flask], audio_site: AudioSite) -> None:
    # A fetch deadline far beyond the test's waits: only the cancel can end this download in time.
    client = make_app(URL_ALLOW=LOOPBACK_ONLY, URL_FETCH_TIMEOUT_S=600).test_client()
    job_id = client.post("/upload", data={"url": audio_site.url("/slow")}).get_json()["transcription_id"]
    partial = client.application.config["UPLOAD_DIR"] / f".incoming-{job_id}"
    # Cancelled only once the body is being written: earlier, an empty folder would prove nothing.
    wait_until(client, job_id, lambda record: partial.exists())
    assert client.delete(f"/jobs/{job_id}").get_json()["status"] == "cancelled"
    # The job's check stops it at its next chunk (0.2 s); 30 s bounds a loaded VM.
    assert audio_site.hung_up.wait(30), "the download went on after the cancel"
    eventually(lambda: not partial.exists(), timeout=30, message="the partial download was not deleted")
    assert list(partial.parent.iterdir()) == []


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"url": "ftp://127.0.0.1/a.wav"}, 400, "invalid_option"),
        ({"url": "http://user:secret@127.0.0.1/a.wav"}, 400, "invalid_option"),
        ({"url": "http:///a.wav"}, 400, "invalid_option"),
        ({"url": "http://127.0.0.1/a b.wav"}, 400, "invalid_option"),
        ({"url": "http://127.0.0.1/é.wav"}, 400, "invalid_option"),
        ({"url": "http://127.0.0.1:99999/a.wav"}, 400, "invalid_option"),
        ({"url": "http://h/" + "a" * 2100}, 400, "invalid_option"),
        ({"url": 5}, 400, "no_url"),
        ({"url": "http://127.0.0.1/a.wav", "language": ["en"]}, 400, "invalid_option"),
        ({"url": "http://127.0.0.1/a.wav", "pad": "x" * 70_000}, 413, "too_large"),
    ],
)
def test_a_url_request_of_the_wrong_form_is_refused_before_a_job_exists(
    client: Any, body: dict[str, Any], status: int, code: str
) -> None:
    response = client.post("/upload", json=body)
    assert (response.status_code, response.get_json()["code"]) == (status, code)
    assert client.get("/jobs").get_json()["jobs"] == []


def test_json_nested_thousands_deep_is_a_bad_request(client: Any) -> None:
    response = client.post("/upload", data=b"[" * 30_000, content_type="application/json")
    assert (response.status_code, response.get_json()["code"]) == (400, "invalid_json")


def test_a_file_and_a_url_together_are_refused(client: Any) -> None:
    response = client.post("/upload", data={"url": "http://127.0.0.1/a.wav", "file": (FIXTURES / "fox.wav").open("rb")})
    assert (response.status_code, response.get_json()["code"]) == (400, "file_and_url")


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.100.100.200", "0.0.0.0",
     "224.0.0.1", "::1", "fe80::1", "fd00:ec2::254", "::ffff:127.0.0.1", "::ffff:169.254.169.254",
     "64:ff9b::a9fe:a9fe", "64:ff9b:1::a00:1", "2002:7f00:1::", "::7f00:1", "::ffff:0:7f00:1", "fec0::1"],
)  # fmt: skip
def test_loopback_private_link_local_multicast_and_metadata_addresses_are_refused(address: str) -> None:
    assert refusal(ipaddress.ip_address(address), []) is not None
    assert refusal(ipaddress.ip_address(address), parse_networks([address])) is None


def test_public_addresses_may_be_fetched() -> None:
    for address in ("93.184.216.34", "2606:2800:220:1::1", "64:ff9b::5db8:d822"):  # the last: NAT64 to a public one
        assert refusal(ipaddress.ip_address(address), []) is None


def test_the_real_model_transcribes_speech_fetched_from_a_url(
    make_real_app: Callable[..., Flask], audio_site: AudioSite, tmp_path: Path
) -> None:
    client = make_real_app(URL_ALLOW=LOOPBACK_ONLY).test_client()
    job_id = client.post("/upload", json={"url": audio_site.url("/lj001-0001.flac")}).get_json()["transcription_id"]
    assert wait_for(client, job_id)["status"] == "completed"
    assert b"printing" in client.get(f"/download/{job_id}.txt").get_data().lower()
