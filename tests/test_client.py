"""The command-line client and its Python API (whisper_flask_client/), against real gunicorn with real speech.

The client never imports the server (lint-imports checks it); these tests read the server's code only to
check that the client knows every error code it sends.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import requests
from rich.console import Console
from rich.text import Text

import whisper_flask.exceptions as server_exceptions
from tests.helpers import FIXTURES, SPOKEN, LiveClient, create_key, eventually
from tests.servers import ROOT, Servers
from whisper_flask.api import errors as server_errors
from whisper_flask_client import Client, Job, JobState, Options
from whisper_flask_client import errors as client_errors
from whisper_flask_client.cli import INTERRUPTED, OK, REFUSED, USAGE, UsageError, _prepare, main, parser
from whisper_flask_client.display import Bars, QuietTracker
from whisper_flask_client.run import Item, Runner
from whisper_flask_client.state import StateFile


def server_codes() -> set[str]:
    """Every machine code the server answers: its exceptions', werkzeug's, its views' and its failed jobs'."""
    codes = set(server_errors._HTTP_CODES.values())
    pending = [server_exceptions.ServiceError]
    while pending:
        kind = pending.pop()
        pending.extend(kind.__subclasses__())
        if kind is not server_exceptions.JobFailed:  # carries the code of the failure it reports
            codes.add(kind.code)
    for module in (ROOT / "whisper_flask" / "api").glob("*.py"):
        codes.update(re.findall(r'ApiError\(\s*\d+,\s*"(\w+)"', module.read_text()))
    return codes | job_failure_codes()


def job_failure_codes() -> set[str]:
    """The codes whisper_flask/jobs/ writes literally as a failed job's error_code (GET /progress's error_code)."""
    # A literal beside JobStatus.FAILED (crash_rule's `ended(...)`) or given to `_fail` (pipeline); the other
    # codes a job fails with are its exceptions' .code, which server_codes' walk collects.
    codes: set[str] = set()
    for module in (ROOT / "whisper_flask" / "jobs").glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            if not isinstance(node, ast.Call):
                continue
            args = node.args
            after_failed = [args[i + 1] for i in range(len(args) - 1) if ast.unparse(args[i]) == "JobStatus.FAILED"]
            given_to_fail = args[1:2] if ast.unparse(node.func).endswith("_fail") else []
            codes.update(
                arg.value
                for arg in after_failed + given_to_fail
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
            )
    return codes


def test_every_code_the_server_sends_has_a_client_exception_named_for_it() -> None:
    codes = server_codes()
    assert {"too_many_jobs", "invalid_api_key", "body_timeout", "method_not_allowed"} <= codes  # the walk works
    assert {"interrupted", "transcription_failed"} <= job_failure_codes()  # the jobs' own codes are read too
    assert codes - client_errors.CODES.keys() == set()


@pytest.mark.parametrize(
    ("status", "body", "retry_after", "kind"),
    [
        (429, {"error": "limit", "code": "too_many_jobs"}, "7", client_errors.TooManyJobs),
        (401, {"error": "no", "code": "invalid_api_key"}, None, client_errors.InvalidApiKey),
        (404, {"error": "gone", "code": "job_not_found"}, None, client_errors.JobNotFound),
        (502, "<html>bad gateway</html>", None, client_errors.ServerError),
        (503, None, "3", client_errors.RetryLater),
    ],
)
def test_an_error_answer_raises_the_exception_named_for_its_code_or_status(
    status: int, body: Any, retry_after: str | None, kind: type[client_errors.ServiceError]
) -> None:
    error = client_errors.error_for(status, body, retry_after)
    assert type(error) is kind
    assert error.status == status
    assert error.retry_after == (float(retry_after) if retry_after else None)


def test_the_state_file_is_private_and_forgets_an_entry_removed(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "state" / "jobs.json")
    state.put("a", {"job_id": "1" * 32})
    state.put("b", {"uploading_since": 1.0, "filename": "x.wav"})
    assert state.get("a") == {"job_id": "1" * 32}
    assert state.job_ids() == {"1" * 32}
    assert (tmp_path / "state" / "jobs.json").stat().st_mode & 0o777 == 0o600
    state.remove("a")
    assert state.get("a") is None and state.get("b") is not None


def test_a_config_file_others_may_read_is_refused_as_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "whisper-flask" / "client.json"
    config.parent.mkdir()
    config.write_text(json.dumps({"key": "secret-key"}))
    config.chmod(0o644)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("WHISPER_FLASK_API_KEY", raising=False)
    assert main(["transcribe", str(FIXTURES / "fox.wav")]) == USAGE
    assert "chmod 600" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["keys", "list"], ["transcribe", "--format", "docx", "x.wav"], []])
def test_admin_commands_and_bad_arguments_are_usage_errors(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WHISPER_FLASK_API_KEY", "k")
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own refusals
        code = int(exit_.code or 0)
    assert code == USAGE


@pytest.fixture(scope="module")
def served(module_servers: Servers) -> dict[str, Any]:
    """Real gunicorn on tiny.en where a key may have one job queued or running at a time; a key per test."""
    # Made before the start, as the installer makes its key.
    keys = {name: create_key(module_servers.work, name) for name in ("many", "interrupted", "python")}
    port, _ = module_servers.gunicorn(MAX_JOBS_PER_KEY="1", AUTH_FAILURES_PER_MINUTE="100")
    return {"port": port, "url": f"http://127.0.0.1:{port}", "keys": keys}


def command(served: dict[str, Any], tmp_path: Path, key: str, *args: str) -> subprocess.Popen[str]:
    """`whisper-flask transcribe ...` in a subprocess, its state under tmp_path, its output piped (no bars)."""
    env = {
        **os.environ,
        "WHISPER_FLASK_API_KEY": key,
        "WHISPER_FLASK_URL": served["url"],
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "whisper_flask_client", "transcribe", *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # SIGINT as a terminal's Ctrl-C reaches it, even when the tests themselves run as a background job,
        # which starts with SIGINT ignored (and a Python started so never turns it into KeyboardInterrupt).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip


def finish(process: subprocess.Popen[str]) -> tuple[int, list[dict[str, Any]], str]:
    """Exit code, the --json lines and stderr of a finished command."""
    out, err = process.communicate(timeout=300)
    return process.returncode, [json.loads(line) for line in out.splitlines()], err


def jobs_named(served: dict[str, Any], key: str, filename: str) -> list[dict[str, Any]]:
    """The key's jobs on the server for one file name, from GET /jobs."""
    jobs = LiveClient(served["port"], key).get("/jobs?limit=1000").get_json()["jobs"]
    return [job for job in jobs if job["filename"] == filename]


def test_files_and_a_directory_are_transcribed_beside_them_waiting_out_the_keys_429s(
    served: dict[str, Any], tmp_path: Path
) -> None:
    key = served["keys"]["many"]
    (tmp_path / "dir").mkdir()
    for name in ("fox.wav", "garden.wav"):
        shutil.copy(FIXTURES / name, tmp_path / "dir" / name)
    shutil.copy(FIXTURES / "train.wav", tmp_path / "train.wav")
    inputs = [str(tmp_path / "dir"), str(tmp_path / "train.wav")]

    # Three at once for a key allowed one: two uploads are refused with 429 until a job ends.
    code, lines, err = finish(command(served, tmp_path, key, *inputs, "--format", "txt,srt", "--jobs", "3", "--json"))

    assert code == OK, err
    assert sorted(line["status"] for line in lines) == ["completed"] * 3, lines
    for path in (tmp_path / "dir" / "fox.wav", tmp_path / "dir" / "garden.wav", tmp_path / "train.wav"):
        text = path.with_suffix(".txt").read_text().lower()
        assert any(words.lower() in text for words in SPOKEN[path.name]), text
        assert "-->" in path.with_suffix(".srt").read_text()
    assert json.loads((tmp_path / "state" / "whisper-flask" / "jobs.json").read_text()) == {}

    # The same command again uploads nothing: every transcript exists.
    code, lines, _ = finish(command(served, tmp_path, key, *inputs, "--format", "txt,srt", "--json"))
    assert code == OK and [line["status"] for line in lines] == ["skipped"] * 3
    assert len(jobs_named(served, key, "fox.wav")) == 1


def test_a_run_interrupted_by_sigint_is_collected_by_the_same_command_without_a_second_upload(
    served: dict[str, Any], tmp_path: Path
) -> None:
    key = served["keys"]["interrupted"]
    # 70 s of speech: tiny.en cannot finish it between the job id's recording and the SIGINT (a 5 s file could).
    audio = tmp_path / "chapter.opus"
    shutil.copy(FIXTURES / "lj001-chapter-70s.opus", audio)
    state = StateFile(tmp_path / "state" / "whisper-flask" / "jobs.json")
    started: list[subprocess.Popen[str]] = []
    try:
        started.append(first := command(served, tmp_path, key, str(audio), "--json"))
        eventually(lambda: bool(state.job_ids()), timeout=60, message="the job id was never recorded")
        first.send_signal(signal.SIGINT)
        code, _, err = finish(first)
        assert code == INTERRUPTED, err
        assert "run the same command again" in err
        (job_id,) = state.job_ids()

        started.append(second := command(served, tmp_path, key, str(audio), "--json"))
        code, lines, err = finish(second)
    finally:  # a failed assertion or wait must not leave a command running (and holding the key's one job)
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()

    assert code == OK, err
    assert lines == [
        {"input": str(audio), "status": "completed", "job_id": job_id, "outputs": [str(audio.with_suffix(".txt"))]}
    ]
    assert "printing" in audio.with_suffix(".txt").read_text().lower()
    assert [job["transcription_id"] for job in jobs_named(served, key, "chapter.opus")] == [job_id]


def test_a_wrong_key_exits_with_its_own_code_and_says_the_service_refused_it(
    served: dict[str, Any], tmp_path: Path
) -> None:
    code, lines, err = finish(command(served, tmp_path, "not-a-key", str(FIXTURES / "fox.wav"), "--json"))
    assert code == REFUSED
    assert lines == []
    assert "refused" in err and "invalid_api_key" in err and "WHISPER_FLASK_API_KEY" in err


def test_the_python_api_transcribes_and_raises_errors_named_for_the_service_codes(served: dict[str, Any]) -> None:
    client = Client(served["url"], served["keys"]["python"])

    transcript = client.transcribe(FIXTURES / "fox.wav")

    assert "lazy dog" in transcript.text.lower() and transcript.segments
    with pytest.raises(client_errors.JobNotFound):
        client.job("0" * 32).state()
    with pytest.raises(client_errors.UnknownFormat):
        client.job(transcript.job_id).download("docx")
    with pytest.raises(client_errors.InvalidApiKey):
        Client(served["url"], "not-a-key").check()


def test_a_server_killed_mid_job_and_restarted_finishes_the_same_job_for_a_waiting_command(
    servers: Servers, tmp_path: Path
) -> None:
    key = create_key(servers.work, "survivor")
    port, process = servers.gunicorn()
    served = {"port": port, "url": f"http://127.0.0.1:{port}"}
    audio = tmp_path / "chapter.opus"
    shutil.copy(FIXTURES / "lj001-chapter-70s.opus", audio)
    state = StateFile(tmp_path / "state" / "whisper-flask" / "jobs.json")
    client = LiveClient(port, key)

    running = command(served, tmp_path, key, str(audio), "--json")
    eventually(lambda: bool(state.job_ids()), timeout=60, message="the job id was never recorded")
    (job_id,) = state.job_ids()
    eventually(lambda: client.get(f"/progress/{job_id}").get_json()["processed_seconds"] > 0, timeout=120,
               message="the job never got past its first window")  # fmt: skip
    os.killpg(process.pid, signal.SIGKILL)  # the arbiter and its worker, mid-job: no graceful stop
    servers.stop(process)
    time.sleep(3)  # down for a while, as under systemd's RestartSec: the command's polls meet a closed port
    servers.gunicorn()  # the same port, as systemd restarts it

    code, lines, err = finish(running)

    assert code == OK, err
    assert [(line["status"], line["job_id"]) for line in lines] == [("completed", job_id)]
    assert "printing" in audio.with_suffix(".txt").read_text().lower()
    assert [job["transcription_id"] for job in jobs_named(served, key, "chapter.opus")] == [job_id], "one upload"
    assert client.get(f"/jobs/{job_id}").get_json()["attempts"] == 2, "resumed once, after the kill"


class ListingClient:
    """A stand-in for Client that lists given jobs: what the service holds after an upload's answer was lost."""

    def __init__(self, jobs: list[dict[str, Any]]) -> None:
        self.listed = jobs

    def jobs(self) -> list[dict[str, Any]]:
        return self.listed

    def job(self, job_id: str) -> Job:
        return Job(self, job_id)  # type: ignore[arg-type]


def test_an_upload_whose_answer_was_lost_is_matched_to_its_job_by_name_and_time_not_sent_again(
    tmp_path: Path,
) -> None:
    state = StateFile(tmp_path / "jobs.json")
    state.put("other", {"job_id": "c" * 32})
    jobs = [  # newest first, as GET /jobs answers
        {"transcription_id": "c" * 32, "filename": "fox.wav", "created_at": "2030-01-01T00:00:09.000+00:00"},
        {"transcription_id": "b" * 32, "filename": "fox.wav", "created_at": "2030-01-01T00:00:05.000+00:00"},
        {"transcription_id": "a" * 32, "filename": "fox.wav", "created_at": "2020-01-01T00:00:00.000+00:00"},
    ]
    runner = Runner(ListingClient(jobs), state, Options(), threading.Event())  # type: ignore[arg-type]
    item = Item(str(tmp_path / "fox.wav"), False, {}, "fox")
    since = datetime(2030, 1, 1, tzinfo=timezone.utc).timestamp()
    state.put("fox", {"uploading_since": since, "filename": "fox.wav"})

    job = runner._existing(item)

    assert job is not None and job.id == "b" * 32  # not the old one, nor another input's
    assert state.get("fox") == {"job_id": "b" * 32}


class FakeResponse:
    """A requests.Response as the client reads it: JSON or bytes."""

    def __init__(self, body: dict[str, Any] | None = None, content: bytes = b"") -> None:
        self.body = body or {}
        self.content = content
        self.status_code = 200

    def json(self) -> dict[str, Any]:
        return self.body


class FinishedClient:
    """A stand-in for Client whose every job has completed with the transcript `text`."""

    def __init__(self, text: bytes = b"the quick brown fox\n") -> None:
        self.text = text

    def job(self, job_id: str) -> Job:
        return Job(self, job_id)  # type: ignore[arg-type]

    def request(self, method: str, path: str, **kwargs: Any) -> FakeResponse:
        if path.startswith("/download/"):
            return FakeResponse(content=self.text)
        job_id = path.rsplit("/", 1)[-1]
        return FakeResponse({"transcription_id": job_id, "status": "completed", "progress": 1.0})


def test_a_transcript_that_cannot_be_written_fails_its_input_and_keeps_the_job_for_the_next_run(
    tmp_path: Path,
) -> None:
    state = StateFile(tmp_path / "jobs.json")
    state.put("fox", {"job_id": "f" * 32})
    (tmp_path / "a-file").write_text("not a directory")
    item = Item(str(tmp_path / "fox.wav"), False, {"txt": tmp_path / "a-file" / "fox.txt"}, "fox")
    runner = Runner(FinishedClient(), state, Options(), threading.Event())  # type: ignore[arg-type]

    result = runner.run(item, QuietTracker())  # an OSError escaping here was a traceback through future.result()

    assert (result.status, result.code, result.job_id) == ("failed", "write_failed", "f" * 32)
    assert state.get("fox") == {"job_id": "f" * 32}, "the next run collects the job"


def prepared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *argv: str) -> tuple[Client, list[Item]]:
    """What `whisper-flask transcribe ARGV` would run, without a service (its config under tmp_path)."""
    monkeypatch.setenv("WHISPER_FLASK_API_KEY", "k")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return _prepare(parser().parse_args(["transcribe", *argv]))


def test_out_is_created_and_one_that_names_a_file_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, (item,) = prepared(tmp_path, monkeypatch, str(FIXTURES / "fox.wav"), "--out", str(tmp_path / "new" / "out"))
    assert (tmp_path / "new" / "out").is_dir()
    assert item.outputs == {"txt": tmp_path / "new" / "out" / "fox.txt"}

    (tmp_path / "a-file").write_text("")
    assert main(["transcribe", str(FIXTURES / "fox.wav"), "--out", str(tmp_path / "a-file")]) == USAGE
    assert "not a directory" in capsys.readouterr().err
    assert main(["transcribe", str(FIXTURES / "fox.wav"), "--out", str(tmp_path / "a-file" / "below")]) == USAGE
    assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("files", "inputs", "out"),
    [
        (["a.wav", "a.mp3"], ["."], None),  # one folder: a.txt for both
        (["x/intro.wav", "y/intro.wav"], ["x", "y"], "out"),  # --out gathers both into out/intro.txt
        ([], ["https://example.com/a/talk.mp3", "https://example.com/b/talk.mp3?x=1"], "out"),  # one last segment
    ],
)
def test_two_inputs_that_would_write_the_same_transcript_are_a_usage_error_naming_both(
    files: list[str], inputs: list[str], out: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(FIXTURES / "fox.wav", tmp_path / name)
    monkeypatch.chdir(tmp_path)
    argv = [*inputs, *(["--out", str(tmp_path / out)] if out else [])]

    with pytest.raises(UsageError) as refused:  # one would silently overwrite the other's transcript
        prepared(tmp_path, monkeypatch, *argv)

    sources = [str((tmp_path / name).resolve()) for name in files] or inputs
    assert all(source in str(refused.value) for source in sources), refused.value


def test_a_urls_transcript_is_named_as_the_service_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _, (item,) = prepared(tmp_path, monkeypatch, "https://example.com/media/talk.mp3/?token=x", "--format", "srt")
    assert item.name == "talk.mp3"
    assert item.outputs == {"srt": tmp_path / "talk.srt"}


def test_bars_show_file_names_and_the_services_words_as_they_are_not_as_markup() -> None:
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=200)
    bars = Bars(console)
    tracker = bars.tracker("talk[/b].wav")  # as markup: MarkupError, a closing tag that matches none
    tracker.note("[red]restyled[/red]")

    console.print(bars.progress.get_renderable())

    shown = Text.from_ansi(screen.getvalue()).plain
    assert "talk[/b].wav" in shown and "[red]restyled[/red]" in shown, shown


@pytest.mark.parametrize(
    ("code", "kind"), [("interrupted", "JobInterrupted"), ("transcription_failed", "TranscriptionFailed")]
)
def test_a_job_failed_with_a_code_of_the_servers_jobs_raises_the_job_error_named_for_it(code: str, kind: str) -> None:
    failure = JobState("a" * 32, "failed", error="it failed", error_code=code).failure()
    assert type(failure).__name__ == kind and isinstance(failure, client_errors.JobError)
    assert (failure.code, failure.message) == (code, "it failed")


def test_a_transcript_is_synced_before_its_name_and_its_rename_before_the_job_is_forgotten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = StateFile(tmp_path / "state" / "jobs.json")
    state.put("fox", {"job_id": "f" * 32})
    transcript = tmp_path / "out" / "fox.txt"
    item = Item(str(tmp_path / "fox.wav"), False, {"txt": transcript}, "fox")
    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)

    result = Runner(FinishedClient(), state, Options(), threading.Event()).run(item, QuietTracker())  # type: ignore[arg-type]

    assert result.status == "completed" and transcript.read_bytes() == b"the quick brown fox\n"
    (at,) = [i for i, event in enumerate(events) if event[0] == "replace" and event[2] == str(transcript)]
    assert ("fsync", events[at][1]) in events[:at], "a power loss could leave the name pointing at no data"
    state_written = next(i for i, event in enumerate(events[at + 1 :], at + 1) if event[0] == "replace")
    assert ("fsync", str(transcript.parent)) in events[at:state_written], "the rename is durable before the entry goes"
    assert state.get("fox") is None


@pytest.mark.parametrize("umask", [0o027, 0o002])
def test_a_transcript_has_the_mode_the_umask_of_the_moment_gives_and_the_state_file_stays_private(
    umask: int, tmp_path: Path
) -> None:
    state = StateFile(tmp_path / "state" / "jobs.json")
    state.put("fox", {"job_id": "f" * 32})
    transcript = tmp_path / "fox.txt"
    item = Item(str(tmp_path / "fox.wav"), False, {"txt": transcript}, "fox")
    runner = Runner(FinishedClient(), state, Options(), threading.Event())  # type: ignore[arg-type]
    before = os.umask(umask)  # after the client's import: a umask read once then would give 0644 here
    try:
        assert runner.run(item, QuietTracker()).status == "completed"
        state.put("other", {"job_id": "e" * 32})
    finally:
        os.umask(before)

    assert transcript.stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "state" / "jobs.json").stat().st_mode & 0o777 == 0o600
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == [], "no temporary file left"


class DownSession:
    """A requests.Session whose every request meets a closed port; `on_request` runs first."""

    def __init__(self, on_request: Any = None) -> None:
        self.headers: dict[str, str] = {}
        self.calls = 0
        self.on_request = on_request

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        self.calls += 1
        if self.on_request is not None:
            self.on_request()
        raise requests.ConnectionError("connection refused")


def test_a_stop_ends_a_reads_connection_retries_at_once_instead_of_after_the_backoff() -> None:
    session = DownSession()
    stop = threading.Event()
    stop.set()
    client = Client("http://127.0.0.1:9", "k", session=session, stop=stop)  # type: ignore[arg-type]
    started = time.monotonic()

    with pytest.raises(requests.ConnectionError):
        client.check()

    assert time.monotonic() - started < 0.4 and session.calls == 1  # the backoff would sleep 15.5 s in all


def test_ctrl_c_during_a_services_outage_interrupts_the_input_at_once_and_keeps_its_job(tmp_path: Path) -> None:
    stop = threading.Event()
    session = DownSession(on_request=stop.set)  # Ctrl-C arrives while the service is unreachable
    state = StateFile(tmp_path / "jobs.json")
    state.put("fox", {"job_id": "f" * 32})
    runner = Runner(Client("http://127.0.0.1:9", "k", session=session), state, Options(), stop)  # type: ignore[arg-type]
    started = time.monotonic()

    result = runner.run(Item(str(tmp_path / "fox.wav"), False, {}, "fox"), QuietTracker())

    assert result.status == "interrupted" and time.monotonic() - started < 0.4
    assert state.get("fox") == {"job_id": "f" * 32}


class CountingState(StateFile):
    """A StateFile that counts its reads of one entry."""

    gets = 0

    def get(self, key: str) -> dict[str, Any] | None:
        self.gets += 1
        return super().get(key)


class SubmittingClient(FinishedClient):
    """A FinishedClient that accepts an upload, noting the state entry as it was while the upload was sent."""

    def __init__(self, state: StateFile) -> None:
        super().__init__()
        self.state = state
        self.entry_while_sending: dict[str, Any] | None = None

    def submit(self, path: str, options: Options, on_bytes: Any = None) -> Job:
        self.entry_while_sending = self.state.get("fox")
        return Job(self, "f" * 32)  # type: ignore[arg-type]


def test_an_uploads_entry_holds_only_what_is_read_and_a_cancel_reads_the_state_once(tmp_path: Path) -> None:
    state = CountingState(tmp_path / "jobs.json")
    client = SubmittingClient(state)
    audio = tmp_path / "fox.wav"
    shutil.copy(FIXTURES / "fox.wav", audio)
    runner = Runner(client, state, Options(), threading.Event())  # type: ignore[arg-type]

    assert runner.run(Item(str(audio), False, {}, "fox"), QuietTracker()).status == "completed"
    assert client.entry_while_sending is not None and set(client.entry_while_sending) == {"uploading_since"}

    state.put("fox", {"job_id": "f" * 32})
    state.gets = 0
    assert runner.cancel(Item(str(audio), False, {}, "fox")).status == "cancelled"
    assert state.gets == 1 and state.get("fox") is None
