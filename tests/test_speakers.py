"""Who spoke when: speaker labels on every route and in every format, offline, on the shared model thread."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flask import Flask
from flask.testing import FlaskClient
from pyannote.core import Annotation, Segment
from pyannote.metrics.diarization import DiarizationErrorRate

from tests.helpers import (
    FIXTURES,
    FakeEngine,
    LiveClient,
    base_config,
    create_key,
    eventually,
    keyed_client_class,
    submit,
    transcripts,
    upload,
    wait_for,
    wait_until,
    wav_bytes,
)
from tests.servers import Servers
from whisper_flask import create_app
from whisper_flask.audio.subprocesses import media_tool
from whisper_flask.engine.diarization import EMBEDDINGS
from whisper_flask.engine.filterbank import MEL_BINS, slice_features
from whisper_flask.engine.precision import CACHE_NAME
from whisper_flask.engine.quantize import fbgemm
from whisper_flask.engine.speakers import Diarization, Turn, label_segments, letters, speaker_names, turns_from
from whisper_flask.extension import get_service
from whisper_flask.jobs.writers import write_transcripts

#: Two people taking turns (LJ Speech and Kathleen, with the reference RTTM; tests/fixtures/SOURCES.md).
TWO_SPEAKERS = FIXTURES / "two-speakers.opus"
THREE_SPEAKERS = FIXTURES / "falcon-three-speakers.opus"


def rttm(text: str) -> Annotation:
    """An RTTM file's turns as pyannote's Annotation."""
    annotation = Annotation()
    for line in text.splitlines():
        fields = line.split()
        annotation[Segment(float(fields[3]), float(fields[3]) + float(fields[4]))] = fields[7]
    return annotation


def error_rate(reference: Path, hypothesis: str) -> float:
    """The diarization error rate of an RTTM against the reference, 0.25 s collars, overlap scored."""
    return float(DiarizationErrorRate(collar=0.25, skip_overlap=False)(rttm(reference.read_text()), rttm(hypothesis)))


# -- the pure parts ------------------------------------------------------------------------------------


def test_overlapping_slices_of_two_speakers_become_turns_split_halfway() -> None:
    slices = [(0.0, 1.5), (0.6, 2.1), (1.2, 2.7), (2.4, 3.9), (3.0, 4.5)]
    assert turns_from(slices, [0, 0, 0, 1, 1]) == [Turn(0.0, 2.55, 0), Turn(2.55, 4.5, 1)]


def test_a_short_interruption_between_one_speakers_turns_is_dropped_and_the_turns_joined() -> None:
    slices = [(0.0, 1.5), (1.5, 3.0), (3.2, 3.8), (4.0, 5.5)]
    assert turns_from(slices, [0, 0, 1, 0]) == [Turn(0.0, 5.5, 0)]


def test_a_slices_filterbanks_are_kaldi_frames_less_their_mean_and_a_slice_under_a_frame_is_padded_to_one() -> None:
    samples = np.random.default_rng(0).standard_normal(48000).astype(np.float32) / 10
    features = slice_features(samples, 1.0, 2.5)
    assert features.shape == (148, MEL_BINS)  # 25 ms frames every 10 ms over 1.5 s
    assert float(features.mean(dim=0).abs().max()) < 1e-4
    assert torch.equal(slice_features(samples[8000:], 1.0, 2.5, offset=8000), features)  # cut by recording time
    assert slice_features(samples, 1.0, 1.01).shape == (1, MEL_BINS)


@pytest.mark.parametrize(("index", "label"), [(0, "A"), (1, "B"), (25, "Z"), (26, "AA"), (27, "AB")])
def test_speakers_are_lettered_in_order(index: int, label: str) -> None:
    assert letters(index) == label


def test_a_known_voice_names_its_speaker_and_the_others_get_letters_in_order_of_speech() -> None:
    diarization = Diarization((Turn(0, 1, 0), Turn(1, 2, 1), Turn(2, 3, 2)), ((1.0, 0.0), (0.0, 1.0), (0.6, 0.8)))
    names = speaker_names(diarization, [(0.0, 1.0), (0.7071, -0.7071)], ["Ada", "Bob"], threshold=0.65)
    assert names == {0: "Bob", 1: "Ada", 2: "A"}, "Bob's voice is 0.71 from speaker 0's: a name, but not Ada's"


def test_a_segment_is_split_where_its_words_speaker_changes() -> None:
    words = [{"word": " Hello", "start": 0.0, "end": 0.5}, {"word": " there.", "start": 0.5, "end": 1.0},
             {"word": " Hi!", "start": 1.3, "end": 1.6}]  # fmt: skip
    result = {"text": " Hello there. Hi!", "segments": [{"id": 0, "start": 0.0, "end": 1.6, "text": " Hello there. Hi!",
                                                         "words": words, "tokens": [1, 2, 3]}]}  # fmt: skip
    labelled = label_segments(result, Diarization((Turn(0, 1.1, 0), Turn(1.1, 2, 1)), ()), {0: "A", 1: "B"})
    assert [(s["id"], s["speaker"], s["text"]) for s in labelled["segments"]] == [(0, "A", " Hello there."),
                                                                                   (1, "B", " Hi!")]  # fmt: skip
    assert labelled["speakers"] == ["A", "B"]
    assert [w["speaker"] for s in labelled["segments"] for w in s["words"]] == ["A", "A", "B"]


def test_a_known_speakers_name_keeps_each_formats_columns(tmp_path: Path) -> None:
    segment = {"id": 0, "seek": 0, "start": 0.0, "end": 1.5, "text": " Hi.", "tokens": [], "speaker": "Linda Smith"}
    result = {"text": " Hi.", "segments": [segment], "language": "en", "speakers": ["Linda Smith"],
              "speaker_turns": [{"start": 0.0, "end": 1.5, "speaker": "Linda Smith"}]}  # fmt: skip
    write_transcripts(result, tmp_path, "job")
    assert (
        tmp_path / "job.rttm"
    ).read_text().split() == "SPEAKER job 1 0.000 1.500 <NA> <NA> Linda_Smith <NA> <NA>".split()
    assert (tmp_path / "job.tsv").read_text().splitlines()[1].split("\t") == ["0", "1500", "Linda Smith", "Hi."]
    assert "<v Linda Smith>Hi." in (tmp_path / "job.vtt").read_text()


# -- on the fake engine ------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["form", "query"])
def test_every_format_carries_the_speakers_whichever_way_diarize_is_asked(client: FlaskClient, route: str) -> None:
    audio = wav_bytes(70)  # the fake engine: speaker A, B, A in its three 30 s windows
    if route == "form":
        job_id = submit(client, audio, diarize="true")
    else:
        job_id = client.post("/upload?diarize=on", data=audio, content_type="audio/wav").get_json()["transcription_id"]
    assert wait_for(client, job_id)["status"] == "completed"
    got = {fmt: data.decode() for fmt, data in transcripts(client, job_id).items()}
    assert set(got) == {"txt", "srt", "vtt", "json", "tsv", "rttm"}
    assert got["txt"] == "A: window 0\n\nB: window 1\n\nA: window 2\n"
    assert "<v B>window 1" in got["vtt"] and "<v A>window 2" in got["srt"]
    assert got["tsv"].splitlines()[:2] == ["start\tend\tspeaker\ttext", "0\t30000\tA\twindow 0"]
    assert json.loads(got["json"])["speakers"] == ["A", "B"]
    assert got["rttm"].splitlines()[1] == f"SPEAKER {job_id} 1 30.000 30.000 <NA> <NA> B <NA> <NA>"


def test_a_job_without_diarize_has_no_speakers_and_no_rttm(client: FlaskClient) -> None:
    job_id = submit(client, wav_bytes(5))
    record = wait_for(client, job_id)
    assert "rttm" not in record["formats"]
    response = client.get(f"/download/{job_id}.rttm")
    assert (response.status_code, response.get_json()["code"]) == (404, "unknown_format")
    assert "speakers" not in json.loads(transcripts(client, job_id)["json"])


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"diarize": "true", "min_speakers": "3", "max_speakers": "2"}, "min_speakers"),
        ({"min_speakers": "2"}, "min_speakers"),
        ({"diarize": "true", "max_speakers": "0"}, "max_speakers"),
        ({"diarize": "maybe"}, "diarize"),
    ],
)
def test_speaker_counts_that_cannot_hold_are_refused_naming_the_field(
    client: FlaskClient, fields: dict[str, str], field: str
) -> None:
    response = upload(client, wav_bytes(1), **fields)
    assert (response.status_code, response.get_json()["code"], response.get_json()["field"]) == (
        400, "invalid_option", field,
    )  # fmt: skip


def test_diarizing_shows_its_own_stage_and_percentage(client: FlaskClient, engine: FakeEngine) -> None:
    engine.speaker_gate.clear()
    job_id = submit(client, wav_bytes(70), diarize="true")  # its windows gave it an ETA
    assert engine.in_diarization.wait(10)
    eventually(lambda: client.get(f"/progress/{job_id}").get_json()["stage_progress"] == 50.0, timeout=10)
    assert client.get(f"/progress/{job_id}").get_json()["stage"] == "diarizing"
    assert client.get(f"/progress/{job_id}").get_json()["eta_seconds"] is None
    engine.speaker_gate.set()
    assert wait_for(client, job_id)["stage_progress"] is None


def test_a_stop_while_diarizing_resumes_after_the_transcription_and_a_kept_diarization_is_not_redone(
    tmp_path: Path, engine: FakeEngine
) -> None:
    config = {**base_config(tmp_path), "MAX_WORKERS": 1}
    key = create_key(tmp_path, "alice")
    app = create_app(config, engine=engine)
    app.test_client_class = keyed_client_class(key)
    engine.speaker_gate.clear()
    job_id = submit(app.test_client(), wav_bytes(70), diarize="true")
    assert engine.in_diarization.wait(10)
    stopping = threading.Thread(target=get_service(app).stop)
    stopping.start()
    stopping.join(30)
    assert not stopping.is_alive(), "the diarizing job did not stop"
    engine.speaker_gate.set()

    def restart() -> Flask:
        restarted = create_app(config, engine=engine)
        restarted.test_client_class = keyed_client_class(key)
        get_service(restarted).start()
        return restarted

    restarted = restart()
    try:
        assert wait_for(restarted.test_client(), job_id)["status"] == "completed"
    finally:
        get_service(restarted).stop()
    assert len(engine.resumed_from) == 1, "the finished transcription was kept: not transcribed again"
    assert engine.diarizations == 2, "a diarization under way when the service stopped runs again"


def test_a_kept_diarization_and_transcription_are_removed_when_the_job_ends(client: FlaskClient) -> None:
    job_id = submit(client, wav_bytes(5), diarize="true")
    assert wait_for(client, job_id)["status"] == "completed"
    service_dir = Path(get_service(client.application).settings.TRANSCRIPT_DIR)
    assert not list(service_dir.glob("*.diarization.json")), "removed with the resume state when the job ends"
    assert not list(service_dir.glob("*.transcribed.json"))


# -- the real model on real speech --------------------------------------------------------------------


def test_two_people_get_their_turns_in_every_format_on_the_real_model(
    make_real_app: Callable[..., Flask], model_dir: Path
) -> None:
    client = make_real_app().test_client()
    job_id = submit(client, TWO_SPEAKERS, diarize="true")
    assert wait_for(client, job_id, timeout=300)["status"] == "completed"
    got = {fmt: data.decode() for fmt, data in transcripts(client, job_id).items()}
    assert json.loads(got["json"])["speakers"] == ["A", "B"]
    turns = got["txt"].split("\n\n")
    assert [turn[:2] for turn in turns] == ["A:", "B:", "A:", "B:"]
    assert "block books" in turns[0].lower(), turns[0]  # LJ001-0004: "produced the block books, ..."
    assert "<v A>" in got["vtt"] and "<v B>" in got["srt"]
    assert error_rate(FIXTURES / "two-speakers.rttm", got["rttm"]) < 0.15
    arithmetic = client.get("/queue").get_json()["arithmetic"]  # as measured on this CPU at load
    assert arithmetic["encoder"] == "none"  # tiny.en: int8 and bf16 are for base only
    assert arithmetic["decoder"] in (("none", "fp16") if fbgemm() else ("none",))  # fp16 loses nothing: measured
    assert arithmetic["speaker_embeddings"] in ("fp32", "bf16")
    kept = json.loads((model_dir / CACHE_NAME).read_text())  # a later start does not measure again
    assert [entry["chosen"] for key, entry in kept.items() if key.endswith(EMBEDDINGS)] == [
        arithmetic["speaker_embeddings"]
    ]


def test_three_speakers_are_found_when_asked_for_and_one_voice_a_second_or_silence_give_one_or_none(
    make_real_app: Callable[..., Flask], tmp_path: Path
) -> None:
    client = make_real_app().test_client()
    second = tmp_path / "second.wav"
    subprocess.run([media_tool("ffmpeg"), "-v", "error", "-i", str(FIXTURES / "lj001-0001.flac"), "-t", "1",
                    str(second)], check=True, timeout=30)  # fmt: skip
    three = submit(client, THREE_SPEAKERS, diarize="true", min_speakers="3", max_speakers="3")
    one = submit(client, FIXTURES / "lj001-0001.flac", diarize="true")
    short = submit(client, second, diarize="true", min_speakers="2")
    silent = submit(client, wav_bytes(1, amplitude=0.0), diarize="true")
    for job_id in (three, one, short, silent):
        assert wait_for(client, job_id, timeout=300)["status"] == "completed"
    assert len(json.loads(client.get(f"/download/{short}.json").get_data())["speakers"]) <= 1
    hypothesis = client.get(f"/download/{three}.rttm").get_data(as_text=True)
    assert error_rate(FIXTURES / "falcon-three-speakers.rttm", hypothesis) < 0.15
    assert json.loads(client.get(f"/download/{one}.json").get_data())["speakers"] == ["A"]
    assert json.loads(client.get(f"/download/{silent}.json").get_data())["speakers"] == []
    assert client.get(f"/download/{silent}.rttm").get_data() == b""


def test_a_url_job_asks_for_speakers_in_its_json_body(client: FlaskClient) -> None:
    response = client.post("/upload", json={"url": "http://example.com/a.wav", "diarize": True, "max_speakers": 2})
    assert response.status_code == 202, response.get_json()
    assert response.get_json()["options"] == {"diarize": True, "max_speakers": 2}


def test_upload_bodies_stay_unchanged_for_jobs_without_speakers(client: FlaskClient) -> None:
    response = client.post("/upload", data={"file": (io.BytesIO(wav_bytes(1)), "a.wav")})
    assert response.get_json()["options"] == {}


def test_a_service_killed_while_diarizing_loses_nothing_and_does_not_transcribe_again(
    servers: Servers, tmp_path: Path, api_key: str
) -> None:
    meeting = tmp_path / "meeting.wav"  # 4 times the two people: 95 s, about 2 s of diarizing
    subprocess.run([media_tool("ffmpeg"), "-v", "error", "-stream_loop", "3", "-i", str(TWO_SPEAKERS), str(meeting)],
                   check=True, timeout=60)  # fmt: skip
    port, server = servers.gunicorn(MAX_WORKERS="1")
    client = LiveClient(port, api_key)
    job_id = submit(client, meeting, diarize="true")
    wait_until(client, job_id, lambda record: record["stage"] == "diarizing", timeout=300)
    os.killpg(server.pid, signal.SIGKILL)  # power loss while diarizing
    server.wait(timeout=30)

    servers.gunicorn(MAX_WORKERS="1")
    record = wait_for(client, job_id, timeout=300)
    assert (record["status"], record["attempts"]) == ("completed", 2)
    log = (tmp_path / "logs" / "whisper_flask.log").read_text()
    assert log.count(f"job {job_id} diarizing") == 2
    assert f"job {job_id} resumes at" not in log, "its kept transcription was used, not transcribed again"
    undisturbed = submit(client, meeting, diarize="true")
    wait_for(client, undisturbed, timeout=300)
    got, expected = transcripts(client, job_id), transcripts(client, undisturbed)
    assert got["txt"] == expected["txt"] and got["txt"].count(b"\n\n") >= 7
    assert got["rttm"].replace(job_id.encode(), b"") == expected["rttm"].replace(undisturbed.encode(), b"")
