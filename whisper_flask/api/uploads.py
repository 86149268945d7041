"""Uploads (multipart or raw body) are streamed into UPLOAD_DIR, unnamed until kept under a server-made name."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import PurePosixPath, PureWindowsPath
from typing import IO

from flask import Request, request
from werkzeug.datastructures import FileStorage

from whisper_flask.api.errors import ApiError
from whisper_flask.exceptions import StorageFull
from whisper_flask.extension import get_service
from whisper_flask.jobs.retention import INCOMING_PREFIX

#: Control characters (C0, DEL, C1), line and paragraph separators, and bidi embeddings,
#: overrides, isolates and marks: they forge log lines, break headers or disguise a name.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


#: Content types whose body is the audio itself, as Whisper-as-a-Service clients send it.
RAW_BODY_TYPES = ("audio/", "video/", "application/octet-stream")
RAW_CHUNK_BYTES = 1024 * 1024
#: A JSON body names a URL and options: it is small, and read whole only up to this size.
MAX_JSON_BYTES = 64 * 1024


class UploadRequest(Request):
    """A request whose multipart files go to an unnamed file in UPLOAD_DIR, never to memory or /tmp."""

    def _get_file_stream(
        self,
        total_content_length: int | None,
        content_type: str | None,
        filename: str | None = None,
        content_length: int | None = None,
    ) -> IO[bytes]:
        return incoming_file()


def incoming_file() -> IO[bytes]:
    """An unnamed file in UPLOAD_DIR (O_TMPFILE): a killed process leaves no partial upload behind."""
    directory = get_service().settings.UPLOAD_DIR
    try:
        # Not tempfile.TemporaryFile: it adds O_EXCL, which forbids keep_upload from linking it.
        return open(os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600), "w+b")
    except (AttributeError, OSError):  # no O_TMPFILE here: a named file the sweep removes if left over
        return tempfile.NamedTemporaryFile(dir=directory, prefix=INCOMING_PREFIX)


@contextlib.contextmanager
def _storing() -> Iterator[None]:
    """Reading the body writes it to UPLOAD_DIR: a failed write is StorageFull (507), not a 500."""
    try:
        yield
    except OSError as exc:
        raise StorageFull(f"the upload could not be stored: {exc.strerror or 'write failed'}") from None


def receive_upload() -> FileStorage:
    """The audio: the multipart `file` part, or the raw body of an audio or video type; else a 400 saying why."""
    with _storing():
        file = _raw_body() if request.mimetype.startswith(RAW_BODY_TYPES) else _file_part()
    file.stream.seek(0, os.SEEK_END)
    if file.stream.tell() == 0:
        raise ApiError(400, "empty_file", f"{client_filename(file.filename)} is empty (0 bytes)")
    file.stream.seek(0)
    return file


def _file_part() -> FileStorage:
    file = request.files.get("file")  # werkzeug streams the body into UPLOAD_DIR here
    if file is None:
        raise ApiError(
            400,
            "no_file",
            "send the audio as a multipart/form-data part named 'file', or as the raw body with an"
            " audio/*, video/* or application/octet-stream Content-Type",
        )
    if not file.filename:
        raise ApiError(400, "no_filename", "the 'file' part has an empty filename")
    return file


def _raw_body() -> FileStorage:
    # request.stream stops at Content-Length, or at MAX_CONTENT_LENGTH (413) for a chunked body.
    stream = incoming_file()
    try:
        shutil.copyfileobj(request.stream, stream, RAW_CHUNK_BYTES)
    except BaseException:  # a body past its time (408) or a full disk: the unnamed file goes now
        stream.close()
        raise
    return FileStorage(stream, filename=request.args.get("filename") or "audio", content_type=request.mimetype)


def requested_url() -> tuple[str, Mapping[str, str]] | None:
    """The URL of a JSON body or of a `url` form field, with the fields that hold the options; None for a file."""
    if request.mimetype == "application/json":
        raw = request.stream.read(MAX_JSON_BYTES + 1)
        if len(raw) > MAX_JSON_BYTES:
            raise ApiError(413, "too_large", f"a JSON body may have at most {MAX_JSON_BYTES} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
            raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("url"), str):
            raise ApiError(400, "no_url", 'a JSON body must be an object with a "url" string')
        return body["url"], {name: _json_field(name, value) for name, value in body.items() if name != "url"}
    if request.mimetype.startswith(RAW_BODY_TYPES):
        return None
    with _storing():
        form, has_file = request.form, "file" in request.files  # werkzeug stores file parts in UPLOAD_DIR here
    if "url" not in form:
        return None
    if has_file:
        raise ApiError(400, "file_and_url", "send either a file or a url, not both")
    return form["url"], form


def _json_field(name: str, value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    if isinstance(value, dict):  # an object option (chunking_strategy), parsed from its JSON text as a form's is
        return json.dumps(value)
    raise ApiError(400, "invalid_option", f"{name}: must be a string, a number, true/false or an object", field=name)


def keep_upload(file: FileStorage) -> str:
    """Give the streamed upload a permanent server-made name in UPLOAD_DIR and return it."""
    name = f"{uuid.uuid4().hex}.upload"
    file.stream.flush()
    # An unnamed file is linked through /proc/self/fd with linkat(AT_SYMLINK_FOLLOW); os.link
    # calls linkat only when given a directory fd (plain link() would fail with EXDEV).
    fds = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.link(str(file.stream.fileno()), get_service().settings.UPLOAD_DIR / name, src_dir_fd=fds)
    finally:
        os.close(fds)
    return name


def client_filename(raw: str | None) -> str:
    """The client's file name as safe data: no directory part, no control or bidi characters, at most 255."""
    name = PureWindowsPath(PurePosixPath(_UNSAFE.sub("", raw or "")).name).name.strip()
    return name[:255] or "audio"
