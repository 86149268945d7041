"""The job ids of a run, kept so that the same command run again collects them instead of uploading again.

One JSON file under XDG state ($XDG_STATE_HOME/whisper-flask/jobs.json): inputs may lie in many (or
read-only) directories and URLs have none, and a job id with the key opens a transcript, so it belongs in
the user's own private directory rather than beside shared media. Entries are keyed by server, input and
options; several commands may run at once, so every change is a locked read-modify-write, then an atomic
replace.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from whisper_flask_client.files import write_atomic

#: An entry: {"job_id": id} once the service accepted the upload, or {"uploading_since": unix time} while
#: the answer to an upload is not known (see run.py, `Runner._reconcile`). Entries of older runs may hold
#: more fields; nothing reads them.
Entry = dict[str, Any]


def default_path() -> Path:
    """$XDG_STATE_HOME/whisper-flask/jobs.json (~/.local/state by default)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "whisper-flask" / "jobs.json"


def entry_key(server: str, source: str, options: dict[str, str]) -> str:
    """The key of one input's job: the same server, input and options find it again."""
    canonical = json.dumps([server.rstrip("/"), source, sorted(options.items())])
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


class StateFile:
    """The run's job ids, shared safely by the threads of one command and by commands run at once."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Entry]]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # also serialises this process's threads: each has its own open()
            entries = self._read()
            before = json.dumps(entries, sort_keys=True)
            yield entries
            if json.dumps(entries, sort_keys=True) != before:
                self._write(entries)
        finally:
            os.close(lock)

    def _read(self) -> dict[str, Entry]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:  # a damaged file must not stop every later run
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self, entries: dict[str, Entry]) -> None:
        # Private (a job id with the key opens a transcript), and durable: the id must survive a crash right
        # after the 202.
        write_atomic(self.path, json.dumps(entries, indent=1, sort_keys=True).encode(), 0o600)

    def get(self, key: str) -> Entry | None:
        """The entry of one input, if a run recorded one."""
        with self._locked() as entries:
            return entries.get(key)

    def put(self, key: str, entry: Entry) -> None:
        """Record (or replace) the entry of one input, on disk before this returns."""
        with self._locked() as entries:
            entries[key] = entry

    def remove(self, key: str) -> None:
        """Forget one input's entry (its job ended and was collected, or was cancelled)."""
        with self._locked() as entries:
            entries.pop(key, None)

    def job_ids(self) -> set[str]:
        """Every job id recorded, by any run."""
        with self._locked() as entries:
            return {str(entry["job_id"]) for entry in entries.values() if entry.get("job_id")}
