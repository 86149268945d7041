"""`whisper-flask transcribe FILE|DIR|URL...`: transcripts beside the inputs, several at once, resumable.

Exit codes: 0 every input transcribed (or skipped), 1 some failed, 2 a usage or configuration error,
3 the service refused the key or could not be reached, 130 interrupted (run the same command again).
The server's admin commands keep their own `whisper-flask` wrapper on the server (deploy/whisper-flask);
this command answers `transcribe` only and says where the others are.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path

import requests

from whisper_flask_client.api import FORMATS, Client, Options
from whisper_flask_client.display import Bars, Quiet
from whisper_flask_client.errors import AuthenticationError, ServiceError
from whisper_flask_client.run import Item, Result, Runner, source_name
from whisper_flask_client.state import StateFile, default_path, entry_key

OK, SOME_FAILED, USAGE, REFUSED, INTERRUPTED = 0, 1, 2, 3, 130
#: Files a directory contributes: what ffmpeg commonly decodes as audio or video.
AUDIO_SUFFIXES = frozenset(
    ".wav .mp3 .m4a .flac .ogg .oga .opus .webm .mp4 .mkv .mov .aac .wma .aif .aiff .amr .3gp".split()
)
DEFAULT_SERVER = "http://127.0.0.1:8000"


class UsageError(Exception):
    """The command line or the configuration cannot be used; exit 2 with the message."""


def config_path() -> Path:
    """$XDG_CONFIG_HOME/whisper-flask/client.json (~/.config by default): {"server": url, "key": key}."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "whisper-flask" / "client.json"


def read_config(path: Path) -> dict[str, str]:
    """The config file's settings; refused unless only its owner may read it (it holds a key)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return {}
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(f"{path} holds an API key and others may read it; run: chmod 600 {path}")
    try:
        data = json.loads(path.read_text())
    except ValueError as error:
        raise UsageError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise UsageError(f'{path} must hold a JSON object such as {{"server": "https://...", "key": "..."}}')
    return {str(name): str(value) for name, value in data.items()}


def parser() -> argparse.ArgumentParser:
    """The command line."""
    top = argparse.ArgumentParser(prog="whisper-flask", description="A client for a whisper_flask service.")
    commands = top.add_subparsers(dest="command", metavar="transcribe")
    run = commands.add_parser("transcribe", help="transcribe files, directories or URLs")
    run.add_argument("inputs", nargs="+", metavar="FILE|DIR|URL")
    run.add_argument("--format", default="txt", help=f"comma-separated, of {','.join(FORMATS)} (default txt)")
    run.add_argument("--language", help="a code ('de') or a name; the service detects it by default")
    run.add_argument("--task", choices=("transcribe", "translate"))
    run.add_argument("--word-timestamps", action="store_true")
    run.add_argument("--out", type=Path, help="write transcripts here instead of beside the inputs")
    run.add_argument("--server", help=f"the service's URL (else WHISPER_FLASK_URL, the config file, {DEFAULT_SERVER})")
    run.add_argument("--jobs", type=int, default=2, help="inputs in flight at once (default 2)")
    run.add_argument("--overwrite", action="store_true", help="transcribe inputs whose transcripts exist")
    run.add_argument("--cancel", action="store_true", help="cancel the jobs earlier runs of these inputs submitted")
    run.add_argument("--json", action="store_true", help="print one JSON line per input")
    return top


def main(argv: list[str] | None = None) -> int:
    """Run the command; return its exit code."""
    args_list = sys.argv[1:] if argv is None else argv
    if args_list and args_list[0] not in ("transcribe", "-h", "--help"):
        _complain(
            f"this client runs `transcribe` only; the server's admin commands ({args_list[0]} ...)"
            " are `sudo whisper-flask ...` on the server machine (/usr/local/sbin/whisper-flask)"
        )
        return USAGE
    args = parser().parse_args(args_list)
    if args.command is None:
        parser().print_help(sys.stderr)
        return USAGE
    try:
        client, items = _prepare(args)
    except UsageError as error:
        _complain(str(error))
        return USAGE
    try:
        client.check()
    except ServiceError as error:
        hint = " (set WHISPER_FLASK_API_KEY)" if isinstance(error, AuthenticationError) else ""
        _complain(f"{client.url} refused the request: {error.message} [{error.code}]{hint}")
        return REFUSED
    except requests.RequestException as error:
        _complain(f"cannot reach {client.url}: {error}")
        return REFUSED
    return _run(args, client, items)


def _prepare(args: argparse.Namespace) -> tuple[Client, list[Item]]:
    formats = [fmt.strip() for fmt in args.format.split(",") if fmt.strip()]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise UsageError(f"--format takes {', '.join(FORMATS)}; not {', '.join(unknown) or 'nothing'}")
    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    config = read_config(config_path())
    key = os.environ.get("WHISPER_FLASK_API_KEY") or config.get("key")
    if not key:
        raise UsageError(f"no API key: set WHISPER_FLASK_API_KEY or put it in {config_path()} (mode 600)")
    server = args.server or os.environ.get("WHISPER_FLASK_URL") or config.get("server") or DEFAULT_SERVER
    if args.out is not None:
        _prepare_out(args.out)
    options = Options(args.language, args.task, args.word_timestamps)
    args.options = options
    items = [
        Item(source, is_url, _outputs(source, is_url, formats, args.out), entry_key(server, source, options.fields()))
        for source, is_url in _expand(args.inputs)
    ]
    if not items:
        raise UsageError("no audio files among the inputs")
    _refuse_collisions(items)
    return Client(server, key), items


def _prepare_out(out: Path) -> None:
    """Create --out, or refuse it now: a file or an unwritable directory would fail every job only at its end."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--out {out}: cannot create the directory: {error.strerror or error}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: the directory is not writable")


def _expand(inputs: list[str]) -> list[tuple[str, bool]]:
    found: list[tuple[str, bool]] = []
    for raw in inputs:
        if raw.startswith(("http://", "https://")):
            found.append((raw, True))
            continue
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
            found.extend((str(p.resolve()), False) for p in files if not p.name.startswith("."))
        elif path.is_file():
            found.append((str(path.resolve()), False))
        else:
            raise UsageError(f"{raw}: no such file or directory")
    return list(dict.fromkeys(found))  # the same file named twice is done once


def _outputs(source: str, is_url: bool, formats: list[str], out: Path | None) -> dict[str, Path]:
    stem = Path(source_name(source, is_url)).stem or "audio"
    directory = out or (Path.cwd() if is_url else Path(source).parent)
    return {fmt: directory / f"{stem}.{fmt}" for fmt in formats}


def _refuse_collisions(items: list[Item]) -> None:
    """Refuse two inputs that would write the same transcript: the later would silently replace the other's."""
    writer: dict[Path, str] = {}
    for item in items:
        for path in item.outputs.values():
            other = writer.setdefault(path.resolve(), item.source)
            if other != item.source:
                hint = "transcribe them in separate runs, each with its own --out"
                raise UsageError(f"{other} and {item.source} would both write {path}; {hint}")


def _run(args: argparse.Namespace, client: Client, items: list[Item]) -> int:
    stop = threading.Event()
    runner = Runner(client, StateFile(default_path()), args.options, stop)
    display = Bars() if sys.stderr.isatty() else Quiet()
    results: list[Result] = []
    todo = [item for item in items if args.cancel or args.overwrite or not _done(item)]
    results += [Result(item.source, "skipped", outputs=_names(item)) for item in items if item not in todo]
    for result in results:
        _report(result, args.json)
    executor = ThreadPoolExecutor(max_workers=args.jobs)
    with display:
        futures: list[Future[Result]] = []
        for item in todo:
            if args.cancel:
                futures.append(executor.submit(runner.cancel, item))
            else:
                futures.append(executor.submit(runner.run, item, display.tracker(Path(item.name).name)))
        try:
            for future in as_completed(futures):
                results.append(future.result())
                _report(results[-1], args.json)
        except KeyboardInterrupt:
            runner.interrupt()  # uploads abort, waits return; every recorded job id stays recorded
            try:
                executor.shutdown(wait=True, cancel_futures=True)
            except KeyboardInterrupt:
                os._exit(INTERRUPTED)  # a second Ctrl-C: the state file still holds what was recorded
            for future in futures:
                if future.done() and not future.cancelled() and future.result() not in results:
                    _report(future.result(), args.json)
            _complain("interrupted; run the same command again to collect the jobs submitted, or with --cancel")
            return INTERRUPTED
    executor.shutdown()
    return SOME_FAILED if any(result.status in ("failed", "interrupted") for result in results) else OK


def _done(item: Item) -> bool:
    return all(path.exists() for path in item.outputs.values())


def _names(item: Item) -> list[str]:
    return [str(path) for path in item.outputs.values()]


def _report(result: Result, as_json: bool) -> None:
    if as_json:
        _say(json.dumps(result.as_json()))
        return
    detail = f" [{result.code}] {result.error}" if result.error and result.code else f" {result.error or ''}"
    _say(f"{result.input}: {result.status}{detail.rstrip()}")


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()  # one line per input as it ends, for a script reading a pipe


def _complain(message: str) -> None:
    sys.stderr.write(f"whisper-flask: {message}\n")
