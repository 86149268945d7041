"""The service's own exceptions: each names its condition with one machine code, used everywhere.

The code is the same in an HTTP error body and in a failed job's record; `errors.py` alone decides
the HTTP status of each (ARCHITECTURE.md, "Rooms").
"""

from __future__ import annotations

import re

#: An absolute path, with or without ffmpeg's `file:` prefix.
_PATH = re.compile(r"(?:file:)?/[^\s:;,'\"]+")


def scrub_paths(message: str) -> str:
    """The message with every absolute path replaced: no client may learn the server's layout."""
    return _PATH.sub("<path>", message)


class JobStopped(BaseException):
    """A running job was told to stop (cancelled, the service stopping); its pipeline handles each kind.

    Raised from a job's check, deep inside code the service does not own (Whisper's loop, a part's
    thread, a subprocess poll). A BaseException, as rq's stop conditions are, so that no
    `except Exception` on the way can swallow it: a stop always reaches the pipeline.
    """


class ServiceError(Exception):
    """A condition the service reports on purpose; `code` names it for machines."""

    code = "service_error"


class QueueFull(ServiceError):
    """No place for another job now; retry after `retry_after` seconds."""

    code = "queue_full"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(ServiceError):
    """The service is stopping (or not started) and takes no work."""

    code = "shutting_down"


class ModelUnavailable(ServiceError):
    """The model failed to load."""

    code = "model_unavailable"


class ModelLoading(ModelUnavailable):
    """The model is still loading."""

    code = "model_loading"


class BrokerUnavailable(ServiceError):
    """A cluster node cannot reach the broker (Redis or RabbitMQ) now; it reconnects by itself."""

    code = "broker_unavailable"


class NotMultilingual(ServiceError):
    """The loaded model is English-only and the request needs another language."""

    code = "model_not_multilingual"


class AudioDecodeError(ServiceError):
    """ffmpeg could not decode the file; the message is ffmpeg's own reason."""

    code = "invalid_audio"


class InvalidAudio(AudioDecodeError):
    """A live session's frame is not the audio it must be (16 kHz 16-bit mono PCM), or arrives too fast."""


class AudioTooLong(ServiceError):
    """The audio lasts longer than MAX_AUDIO_HOURS."""

    code = "audio_too_long"


class FetchFailed(ServiceError):
    """Audio could not be fetched from the job's URL; the message says why (a status, an error, a refusal)."""

    code = "fetch_failed"


class AddressRefused(FetchFailed):
    """The URL's host is at an address the service may not connect to (URL_ALLOW lists exceptions)."""


class DecodeTimeout(AudioDecodeError):
    """ffmpeg or ffprobe ran past the time its file's length allows; the file is refused."""

    code = "decode_timeout"


class Busy(QueueFull):
    """As many requests of a kind as may hold an HTTP thread are running; retry after `retry_after` seconds."""

    code = "busy"


class InvalidOption(ServiceError):
    """A transcription option a client sent is not valid; `field` names it."""

    code = "invalid_option"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class ModelNotFound(ServiceError):
    """A request named a model this service does not serve."""

    code = "model_not_found"


class JobFailed(ServiceError):
    """A job a request waited for ended failed; the error carries the job's own code and reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class TransientStorageError(ServiceError):
    """A write that cannot be made now but may be later: a running job waits and tries it again."""

    code = "storage_unavailable"


class StorageFull(TransientStorageError):
    """The disk takes no more: an upload, the job database or a transcript (full, over quota, read-only uploads)."""

    code = "storage_full"


class DatabaseUnavailable(TransientStorageError):
    """The job database (PostgreSQL) does not answer now; every node reconnects by itself."""

    code = "database_unavailable"


class JobNotFound(ServiceError):
    """No job has this id (or it was forgotten after expiring)."""

    code = "job_not_found"


class JobExpired(ServiceError):
    """The job's files were deleted: by the retention sweep, or by DELETE /jobs/<id> once it had ended."""

    code = "expired"


class UnknownFormat(ServiceError):
    """A transcript format the service does not write."""

    code = "unknown_format"


class TranscriptNotReady(ServiceError):
    """The job is pending or running; `status` and `progress` say how far it is."""

    code = "not_ready"

    def __init__(self, message: str, status: str, progress: float) -> None:
        super().__init__(message)
        self.status = status
        self.progress = progress


class NoTranscript(ServiceError):
    """The job ended without a transcript (failed or cancelled)."""

    code = "no_transcript"

    def __init__(self, message: str, status: str) -> None:
        super().__init__(message)
        self.status = status


class TranscriptMissing(ServiceError):
    """The job completed but its transcript file is gone."""

    code = "transcript_not_found"


class WriteFailed(ServiceError):
    """The transcript directory refused a write; the job fails with this code."""

    code = "write_failed"

    def __init__(self, error: OSError) -> None:
        super().__init__(f"could not write to the transcript directory: {error.strerror or error}")


class ApiKeyError(ServiceError):
    """A key command that cannot be done (a bad or taken name, no such key); the message says why."""

    code = "api_key_error"


class Unauthenticated(ServiceError):
    """No API key came with the request, or it is not an active key (wrong and revoked look alike)."""

    code = "invalid_api_key"


class MissingKey(Unauthenticated):
    """The request carried no API key at all."""

    code = "missing_api_key"


class TooManyFailures(ServiceError):
    """This address sent too many wrong keys lately; retry after `retry_after` seconds."""

    code = "too_many_failures"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TooManyJobs(ServiceError):
    """This key has MAX_JOBS_PER_KEY jobs pending or running; retry after `retry_after` seconds."""

    code = "too_many_jobs"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TooManyNotifications(ServiceError):
    """This key asked for NOTIFY_PER_KEY_PER_HOUR webhooks and e-mails within the hour; retry after `retry_after` s."""

    code = "too_many_notifications"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class LinkRefused(ServiceError):
    """A signed download link that is malformed or tampered with."""

    code = "link_invalid"


class LinkExpired(LinkRefused):
    """A signed download link past its expiry."""

    code = "link_expired"


class LinkRevoked(LinkRefused):
    """A signed download link to a job whose key has been revoked."""

    code = "link_revoked"


class WhisperIncompatible(RuntimeError):
    """The installed openai-whisper lacks an internal the engine relies on; the service refuses to start."""
