"""Uploads are streamed by werkzeug straight into UPLOAD_DIR under server-made names."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import PurePosixPath, PureWindowsPath
from typing import IO

from flask import Request, current_app, request
from werkzeug.datastructures import FileStorage

from ..errors import ApiError
from ..exceptions import StorageFull


class UploadRequest(Request):
    """A request whose multipart files go to an anonymous file in UPLOAD_DIR, never to memory or /tmp."""

    def _get_file_stream(
        self,
        total_content_length: int | None,
        content_type: str | None,
        filename: str | None = None,
        content_length: int | None = None,
    ) -> IO[bytes]:
        # Deleted when the request closes unless keep_upload() has linked it to a name.
        return tempfile.NamedTemporaryFile(dir=current_app.config["UPLOAD_DIR"], prefix=".incoming-")


def receive_upload() -> FileStorage:
    """The request's `file` part, or a 400 that says what is wrong with it."""
    try:
        file = request.files.get("file")  # werkzeug streams the body into UPLOAD_DIR here
    except OSError as exc:
        raise StorageFull(f"the upload could not be stored: {exc.strerror or exc}") from None
    if file is None:
        raise ApiError(400, "no_file", "send the audio as a multipart/form-data part named 'file'")
    if not file.filename:
        raise ApiError(400, "no_filename", "the 'file' part has an empty filename")
    file.stream.seek(0, os.SEEK_END)
    if file.stream.tell() == 0:
        raise ApiError(400, "empty_file", f"{client_filename(file)} is empty (0 bytes)")
    file.stream.seek(0)
    return file


def keep_upload(file: FileStorage) -> str:
    """Give the streamed upload a permanent server-made name in UPLOAD_DIR and return it."""
    name = f"{uuid.uuid4().hex}.upload"
    file.stream.flush()
    os.link(file.stream.name, current_app.config["UPLOAD_DIR"] / name)
    return name


def client_filename(file: FileStorage) -> str:
    """The client's file name without any directory part; metadata only, never a path."""
    raw = file.filename or ""
    return PureWindowsPath(PurePosixPath(raw).name).name[:255] or "audio"
