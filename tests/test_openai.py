"""OpenAI's audio API, driven by the official openai client against real gunicorn, the real model and real speech."""

from __future__ import annotations

import base64
import io
import threading
import uuid
from pathlib import Path
from typing import Any

import openai
import pytest
from flask.testing import FlaskClient
from openai.types.audio import TranscriptionDiarized

from tests.helpers import FIXTURES, LiveClient, create_key, eventually, wait_for, wav_bytes
from tests.servers import Servers
from whisper_flask.engine.checkpoints import ensure_checkpoint

TWO_SPEAKERS = FIXTURES / "two-speakers.opus"  # LJ, Kathleen, LJ, Kathleen (two-speakers.rttm)
LJ_VOICE = FIXTURES / "lj001-0007-voice.opus"  # the first speaker, in another utterance
ENGLISH = FIXTURES / "lj001-0001.flac"  # "Printing, in the only sense with which we are at present concerned, ..."
ENGLISH_WORDS = {"printing", "sense", "present", "concerned", "arts", "crafts", "exhibition"}
LONG = FIXTURES / "lj001-chapter-70s.opus"  # 70 s: three windows
SPANISH = FIXTURES / "mls-es-13697-11991-000000.opus"
KEYS = ("user", "limited", "busy", "leaver", "streamer")
MAX_JOBS_PER_KEY = 3
MAX_WAITING_REQUESTS = 2


@pytest.fixture(scope="module")
def served(module_servers: Servers, model_dir: Path) -> dict[str, Any]:
    """Real gunicorn on the multilingual base model, with one key per test that needs its own jobs."""
    ensure_checkpoint("base", model_dir, allow_download=False)
    keys = {name: create_key(module_servers.work, name) for name in KEYS}
    port, _ = module_servers.gunicorn(
        MODEL="base", MAX_JOBS_PER_KEY=str(MAX_JOBS_PER_KEY), MAX_WAITING_REQUESTS=str(MAX_WAITING_REQUESTS)
    )
    return {"port": port, "keys": keys, "uploads": module_servers.work / "uploads"}


def client_for(served: dict[str, Any], key: str = "user", **options: Any) -> openai.OpenAI:
    """The official client, pointed at the service only by its base URL and key; it never retries here."""
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{served['port']}/v1",
        api_key=served["keys"].get(key, key),
        max_retries=0,
        **options,
    )


def words(text: str) -> set[str]:
    """The lower-case words of a text, without punctuation."""
    return {"".join(ch for ch in word if ch.isalnum()) for word in text.lower().split()}


def jobs_of(served: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """A key's jobs, newest first, from the native API."""
    jobs: list[dict[str, Any]] = LiveClient(served["port"], served["keys"][key]).get("/jobs").get_json()["jobs"]
    return jobs


def test_models_are_listed_and_retrieved_in_openai_shapes(served: dict[str, Any]) -> None:
    client = client_for(served)
    assert [model.id for model in client.models.list()] == [
        "whisper-1", "base", "gpt-4o-transcribe-diarize", "whisper-1-diarize", "base-diarize",
    ]  # fmt: skip
    model = client.models.retrieve("whisper-1")
    assert (model.id, model.object) == ("whisper-1", "model")
    with pytest.raises(openai.NotFoundError) as error:
        client.models.retrieve("gpt-4o-transcribe")
    assert (error.value.code, error.value.param) == ("model_not_found", "model")


@pytest.mark.parametrize("response_format", ["json", "text", "srt", "vtt", "verbose_json"])
def test_every_response_format_parses_in_the_client_with_the_spoken_words(
    served: dict[str, Any], response_format: str
) -> None:
    with ENGLISH.open("rb") as audio:
        result: Any = client_for(served).audio.transcriptions.create(
            file=audio,
            model="whisper-1",
            response_format=response_format,  # type: ignore[arg-type]
        )
    text = result if isinstance(result, str) else result.text
    assert ENGLISH_WORDS <= words(text), text
    if response_format == "srt":
        assert "00:00:00,000 --> " in result
    if response_format == "vtt":
        assert result.startswith("WEBVTT")
    if response_format == "verbose_json":
        assert (result.task, result.language) == ("transcribe", "english")
        assert 9 < result.duration < 10
        assert result.segments and result.words is None
        assert result.segments[0].start == 0 and result.segments[-1].end <= result.duration + 0.5


@pytest.mark.parametrize("granularities", [["segment"], ["word"], ["word", "segment"]])
def test_timestamp_granularities_choose_segments_and_words(served: dict[str, Any], granularities: list[str]) -> None:
    with ENGLISH.open("rb") as audio:
        result = client_for(served).audio.transcriptions.create(
            file=audio,
            model="base",
            response_format="verbose_json",
            timestamp_granularities=granularities,  # type: ignore[arg-type]
        )
    assert (result.segments is not None) == ("segment" in granularities)
    assert (result.words is not None) == ("word" in granularities)
    if result.words is not None:
        assert ENGLISH_WORDS <= words(" ".join(word.word for word in result.words))
        starts = [word.start for word in result.words]
        assert starts == sorted(starts) and all(word.start <= word.end for word in result.words)


def test_word_granularity_without_verbose_json_is_a_bad_request(served: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError) as error, ENGLISH.open("rb") as audio:
        client_for(served).audio.transcriptions.create(
            file=audio, model="whisper-1", response_format="json", timestamp_granularities=["word"]
        )
    assert error.value.param == "timestamp_granularities[]"


def test_translation_turns_spanish_speech_into_english_text(served: dict[str, Any]) -> None:
    with SPANISH.open("rb") as audio:
        translations = client_for(served).audio.translations
        result = translations.create(file=audio, model="whisper-1", response_format="verbose_json")
    assert result.language == "spanish"
    assert {"the", "and"} <= words(result.text), result.text
    assert not {"sorpresa", "disgusto", "palabras", "labios"} & words(result.text), result.text


@pytest.mark.parametrize(
    "strategy, stored",
    [("auto", {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 200}),
     ({"type": "server_vad", "silence_duration_ms": 500},
      {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500})],
    ids=["auto", "server_vad"],
)  # fmt: skip
def test_a_chunking_strategy_from_the_client_transcribes_in_chunks(
    served: dict[str, Any], strategy: Any, stored: dict[str, Any]
) -> None:
    with LONG.open("rb") as audio:
        result = client_for(served).audio.transcriptions.create(
            file=audio, model="whisper-1", response_format="verbose_json", chunking_strategy=strategy
        )
    assert {"printing", "exhibition", "chinese"} <= words(result.text), result.text
    assert result.segments and [segment.start for segment in result.segments] == sorted(
        segment.start for segment in result.segments
    )
    assert jobs_of(served, "user")[0]["options"]["chunking_strategy"] == stored


def test_streaming_sends_each_window_before_the_job_ends_then_the_whole_text(served: dict[str, Any]) -> None:
    deltas: list[str] = []
    status_at_first_delta = None
    with LONG.open("rb") as audio:
        stream = client_for(served, "streamer").audio.transcriptions.create(file=audio, model="whisper-1", stream=True)
        for event in stream:
            if event.type == "transcript.text.delta":
                if not deltas:
                    status_at_first_delta = jobs_of(served, "streamer")[0]["status"]
                deltas.append(event.delta)
            else:
                done = event
    assert status_at_first_delta == "in_progress"
    assert len(deltas) > 3
    assert done.type == "transcript.text.done" and done.text == "".join(deltas).strip()
    assert {"printing", "chinese", "movable", "typography"} <= words(done.text)
    assert jobs_of(served, "streamer")[0]["status"] == "completed"


def test_a_request_shaped_like_open_webui_gets_its_text(served: dict[str, Any]) -> None:
    # Open WebUI posts the file part without a Content-Type, with `model` and `language` only, and reads `text`.
    boundary = uuid.uuid4().hex
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="recording.flac"\r\n\r\n'.encode()
        + ENGLISH.read_bytes()
        + f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1'
        f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="language"\r\n\r\nen\r\n--{boundary}--\r\n'.encode()
    )
    response = LiveClient(served["port"], served["keys"]["user"]).open(
        "POST", "/v1/audio/transcriptions", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert response.status_code == 200
    assert ENGLISH_WORDS <= words(response.get_json()["text"])


ERRORS = {
    # case -> (exception class, code, request changes)
    "wrong key": (openai.AuthenticationError, "invalid_api_key", {"key": "wf_" + "x" * 43}),
    "unknown model": (openai.NotFoundError, "model_not_found", {"model": "whisper-2"}),
    "unknown format": (openai.BadRequestError, "invalid_value", {"response_format": "docx"}),
    "unknown language": (openai.BadRequestError, "invalid_option", {"language": "klingon"}),
    "temperature out of range": (openai.BadRequestError, "invalid_option", {"temperature": 3}),
    "not audio": (openai.BadRequestError, "invalid_audio", {"file": ("notes.mp3", b"these are not sounds " * 50)}),
    "empty file": (openai.BadRequestError, "empty_file", {"file": ("empty.wav", b"")}),
}


@pytest.mark.parametrize("case", ERRORS)
def test_each_error_reaches_the_client_as_its_exception_class(served: dict[str, Any], case: str) -> None:
    kind, code, changes = ERRORS[case]
    request: dict[str, Any] = {"file": ("speech.wav", wav_bytes(1)), "model": "whisper-1", **changes}
    client = client_for(served, request.pop("key", "user"))
    with pytest.raises(kind) as error:
        client.audio.transcriptions.create(**request)
    assert error.value.code == code
    assert isinstance(error.value.body, dict) and error.value.body["message"]


def test_a_key_past_its_job_limit_gets_a_rate_limit_error(served: dict[str, Any]) -> None:
    native = LiveClient(served["port"], served["keys"]["limited"])
    held = [native.post("/upload", {"file": (io.BytesIO(LONG.read_bytes()), "long.opus")}) for _ in range(3)]
    assert [response.status_code for response in held] == [202] * MAX_JOBS_PER_KEY
    try:
        with pytest.raises(openai.RateLimitError) as error, ENGLISH.open("rb") as audio:
            client_for(served, "limited").audio.transcriptions.create(file=audio, model="whisper-1")
        assert error.value.code == "too_many_jobs"
        assert int(error.value.response.headers["Retry-After"]) > 0
    finally:
        for response in held:
            native.delete(f"/jobs/{response.get_json()['transcription_id']}")


def test_waiting_requests_past_the_bound_get_503_and_cancelled_jobs_end_their_streams(served: dict[str, Any]) -> None:
    outcomes: list[BaseException | None] = []

    def stream_long() -> None:
        try:
            with LONG.open("rb") as audio:
                for _ in client_for(served, "busy").audio.transcriptions.create(file=audio, model="base", stream=True):
                    pass
            outcomes.append(None)
        except openai.APIError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=stream_long) for _ in range(MAX_WAITING_REQUESTS)]
    for thread in threads:
        thread.start()
    eventually(
        lambda: len(jobs_of(served, "busy")) >= MAX_WAITING_REQUESTS, 60, "the waiting requests' jobs never appeared"
    )
    with pytest.raises(openai.InternalServerError) as error, ENGLISH.open("rb") as audio:
        client_for(served, "busy").audio.transcriptions.create(file=audio, model="whisper-1")
    assert (error.value.status_code, error.value.code) == (503, "busy")
    native = LiveClient(served["port"], served["keys"]["busy"])
    for job in jobs_of(served, "busy"):
        native.delete(f"/jobs/{job['transcription_id']}")
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a stream did not end within 60 s of its cancel"
    assert [getattr(outcome, "code", None) for outcome in outcomes] == ["no_transcript"] * MAX_WAITING_REQUESTS


def test_a_client_that_leaves_does_not_lose_the_work(served: dict[str, Any]) -> None:
    with pytest.raises(openai.APITimeoutError), LONG.open("rb") as audio:
        client_for(served, "leaver", timeout=3).audio.transcriptions.create(file=audio, model="whisper-1")
    native = LiveClient(served["port"], served["keys"]["leaver"])
    # The client may give up while the server still probes the upload: the job comes a moment later.
    eventually(lambda: len(jobs_of(served, "leaver")) == 1, timeout=30)
    (job,) = jobs_of(served, "leaver")
    assert wait_for(native, job["transcription_id"], timeout=300)["status"] == "completed"
    text = native.get(f"/download/{job['transcription_id']}.txt").get_data(as_text=True)
    assert {"printing", "movable"} <= words(text)


def test_errors_under_v1_take_openais_envelope_and_native_errors_keep_theirs(client: FlaskClient) -> None:
    error = client.get("/v1/no-such-route").get_json()["error"]
    assert error.pop("message") and error == {"type": "invalid_request_error", "param": None, "code": "not_found"}
    native = client.get("/jobs/" + "0" * 32).get_json()
    assert native.pop("error") and native == {"code": "job_not_found"}


def test_a_job_that_fails_while_its_request_waits_answers_500_with_the_jobs_reason(client: FlaskClient) -> None:
    data = {"file": (io.BytesIO(wav_bytes(5)), "a.wav"), "model": "whisper-1", "prompt": "crash"}
    response = client.post("/v1/audio/transcriptions", data=data)
    assert response.status_code == 500
    error = response.get_json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "transcription_failed")
    assert "the fake engine was asked to crash" in error["message"]


def test_a_v1_request_is_an_ordinary_job_of_its_key(client: FlaskClient) -> None:
    data = {"file": (io.BytesIO(wav_bytes(40)), "meeting.wav"), "model": "whisper-1"}
    response = client.post("/v1/audio/transcriptions", data=data)
    assert response.get_json() == {"text": "window 0 window 1"}
    (job,) = client.get("/jobs").get_json()["jobs"]
    assert (job["transcription_id"], job["filename"], job["status"]) == (
        response.headers["X-Job-Id"],
        "meeting.wav",
        "completed",
    )
    assert client.get(f"/download/{job['transcription_id']}.txt").get_data(as_text=True) == "window 0\nwindow 1\n"


def data_url(path: Path) -> str:
    """A recording as a data URL, as OpenAI's known_speaker_references[] take it."""
    return "data:audio/ogg;base64," + base64.b64encode(path.read_bytes()).decode()


def test_diarized_json_parses_in_the_client_with_each_speakers_turns(served: dict[str, Any]) -> None:
    with TWO_SPEAKERS.open("rb") as audio:
        result = client_for(served).audio.transcriptions.create(
            file=audio, model="gpt-4o-transcribe-diarize", response_format="diarized_json"
        )
    assert isinstance(result, TranscriptionDiarized)
    assert (result.task, round(result.duration)) == ("transcribe", 24)
    speakers = [segment.speaker for segment in result.segments]
    assert [speaker for index, speaker in enumerate(speakers) if speakers[index - 1 : index] != [speaker]] == [
        "A", "B", "A", "B",
    ]  # fmt: skip
    assert all(segment.type == "transcript.text.segment" and segment.id for segment in result.segments)
    assert "block books" in " ".join(s.text for s in result.segments if s.speaker == "A").lower()


def test_a_known_speakers_sample_names_their_turns_and_the_other_gets_a_letter(served: dict[str, Any]) -> None:
    with TWO_SPEAKERS.open("rb") as audio:
        result = client_for(served).audio.transcriptions.create(
            file=audio, model="gpt-4o-transcribe-diarize", response_format="diarized_json",
            known_speaker_names=["Linda"], known_speaker_references=[data_url(LJ_VOICE)],
        )  # fmt: skip
    by_speaker = {speaker: [s.start for s in result.segments if s.speaker == speaker] for speaker in ("Linda", "A")}
    assert set(segment.speaker for segment in result.segments) == {"Linda", "A"}
    assert min(by_speaker["Linda"]) < 1 and any(13 < start < 20 for start in by_speaker["Linda"]), by_speaker
    # Kathleen speaks from 6.04 s to 13.48 s and from 19.97 s (the RTTM); Whisper's segment may start a
    # timestamp step before her voice (6.0 s was seen), never inside Linda's first turn (to 5.64 s).
    assert all(5.9 <= start < 13.5 or start > 19.5 for start in by_speaker["A"]), by_speaker


def test_a_diarized_stream_sends_deltas_then_each_segment_with_its_speaker(served: dict[str, Any]) -> None:
    with TWO_SPEAKERS.open("rb") as audio:
        stream = client_for(served, "streamer").audio.transcriptions.create(
            file=audio, model="whisper-1", response_format="diarized_json", stream=True
        )
        events = list(stream)
    segments = [event for event in events if event.type == "transcript.text.segment"]
    deltas = [event.delta for event in events if event.type == "transcript.text.delta"]
    assert events[-1].type == "transcript.text.done" and events[-1].text == "".join(deltas).strip()
    assert {segment.speaker for segment in segments} == {"A", "B"}
    assert " ".join(segment.text for segment in segments) == events[-1].text


@pytest.mark.parametrize(
    ("names", "references", "response_format", "param"),
    [
        (list("ABCDE"), ["x"] * 5, "diarized_json", "known_speaker_names[]"),
        (["Ann"], ["data:audio/wav;base64,AAAA"], "diarized_json", "known_speaker_references[]"),
        (["Ann"], ["https://example.com/a.wav"], "diarized_json", "known_speaker_references[]"),
        (["Ann", "Bob"], ["data:audio/wav;base64,AAAA"], "diarized_json", "known_speaker_references[]"),
        (["<v Ann>"], ["data:audio/wav;base64,AAAA"], "diarized_json", "known_speaker_names[]"),
        (["Ann"], [data_url(LONG)], "diarized_json", "known_speaker_references[]"),  # 70 s: over 30 s
        (["Ann"], [data_url(LJ_VOICE)], "json", "known_speaker_names[]"),  # speakers need diarized_json
    ],
)
def test_known_speakers_that_cannot_be_used_are_refused_naming_the_field(
    served: dict[str, Any], names: list[str], references: list[str], response_format: str, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as error, ENGLISH.open("rb") as audio:
        client_for(served).audio.transcriptions.create(
            file=audio, model="whisper-1", response_format=response_format,  # type: ignore[call-overload]
            known_speaker_names=names, known_speaker_references=references,
        )  # fmt: skip
    assert (error.value.code, error.value.param) == ("invalid_option", param)
    assert not any(Path(served["uploads"]).glob("*.speaker-*")), "refused samples are not left behind"
