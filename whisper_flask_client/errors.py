"""The service's errors as exceptions, one named for each machine code of its JSON error contract.

The service answers `{"error": message, "code": machine_code, ...}`; `error_for` turns such an answer into
the exception named for its code; a failed job's `error_code` is read the same way (JobState.failure).
The mapping is the client's own (it never imports the server); a test walks the server's exceptions, error
handlers and the codes its jobs fail with, and checks that every code they send is here.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """An error answer of the service: `code` names it for machines, `status` is its HTTP status."""

    def __init__(self, message: str, code: str, status: int, body: dict[str, Any], retry_after: float | None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.body = body
        self.retry_after = retry_after


# The kinds a caller usually handles as one: try later, fix the key, fix the request, the job is gone.
class RetryLater(ServiceError):
    """The service has no room now (429/503); `retry_after` says when to try again."""


class AuthenticationError(ServiceError):
    """The key is missing, wrong or revoked."""


class RequestError(ServiceError):
    """The request itself was refused (a bad option, file or query); sending it again will not help."""


class NotFound(ServiceError):
    """What was asked for does not exist (or no longer)."""


class JobError(ServiceError):
    """A job ended without the transcript asked for."""


class ServerError(ServiceError):
    """The service failed, or an error this client does not know."""


class QueueFull(RetryLater):
    """queue_full: the service's queue is full."""


class Busy(RetryLater):
    """busy: as many requests of this kind as may wait are waiting."""


class ShuttingDown(RetryLater):
    """shutting_down: the service is stopping or not started."""


class ModelLoading(RetryLater):
    """model_loading: the model is still loading."""


class DatabaseUnavailable(RetryLater):
    """database_unavailable: the service's job database does not answer now (a cluster's PostgreSQL)."""


class BrokerUnavailable(RetryLater):
    """broker_unavailable: a cluster's API node cannot reach its broker now."""


class TooManyJobs(RetryLater):
    """too_many_jobs: this key has as many jobs queued or running as it may."""


class TooManyFailures(RetryLater):
    """too_many_failures: this address sent too many wrong keys lately."""


class TooManyNotifications(RetryLater):
    """too_many_notifications: this key asked for too many webhooks and e-mails this hour."""


class InvalidApiKey(AuthenticationError):
    """invalid_api_key: the key is not an active key (wrong and revoked look alike)."""


class MissingApiKey(AuthenticationError):
    """missing_api_key: the request carried no key."""


class LinkInvalid(AuthenticationError):
    """link_invalid: a signed link is malformed or tampered with."""


class LinkExpired(LinkInvalid):
    """link_expired: a signed link is past its expiry."""


class LinkRevoked(LinkInvalid):
    """link_revoked: a signed link's key was revoked."""


class InvalidOption(RequestError):
    """invalid_option: a transcription option is not valid; `field` names it."""


class InvalidAudio(RequestError):
    """invalid_audio: the file could not be decoded."""


class DecodeTimeout(InvalidAudio):
    """decode_timeout: decoding ran past the time the file's length allows."""


class AudioTooLong(RequestError):
    """audio_too_long: the audio is longer than the service accepts."""


class FetchFailed(RequestError):
    """fetch_failed: the service could not fetch the audio's URL."""


class ModelNotMultilingual(RequestError):
    """model_not_multilingual: the loaded model is English-only and the request needs another language."""


class ApiKeyError(RequestError):
    """api_key_error: a key command that cannot be done."""


class EmptyFile(RequestError):
    """empty_file: the upload has no bytes."""


class InvalidQuery(RequestError):
    """A malformed request: invalid_query, invalid_value, missing_parameter, invalid_json, no_url, no_file, ..."""


class TooLarge(RequestError):
    """too_large: the body is larger than the service accepts."""


class BodyTimeout(RequestError):
    """body_timeout: the body did not arrive in time."""


class JobNotFound(NotFound):
    """job_not_found: no job has this id for this key."""


class ModelNotFound(NotFound):
    """model_not_found: the service does not serve this model."""


class UnknownFormat(NotFound):
    """unknown_format: the service writes no transcript in this format."""


class TranscriptNotFound(NotFound):
    """transcript_not_found: the job completed but its transcript file is gone."""


class Expired(NotFound):
    """expired: the job's files were deleted."""


class NotReady(JobError):
    """not_ready: the job is pending or running."""


class NoTranscript(JobError):
    """no_transcript: the job ended without a transcript (failed or cancelled)."""


class JobInterrupted(JobError):
    """interrupted: the service stopped during the job as often as it retries one; it was not run again."""


class TranscriptionFailed(JobError):
    """transcription_failed: the transcription crashed on the service (a bug or the audio's, not the request's)."""


class StorageFull(ServerError):
    """storage_full: the service's disk takes no more."""


class WriteFailed(ServerError):
    """write_failed: the service could not write the transcript."""


class ModelUnavailable(ServerError):
    """model_unavailable: the model failed to load."""


#: The exception for each machine code the service sends.
CODES: dict[str, type[ServiceError]] = {
    "service_error": ServerError,
    "internal_error": ServerError,
    "queue_full": QueueFull,
    "busy": Busy,
    "shutting_down": ShuttingDown,
    "model_loading": ModelLoading,
    "model_unavailable": ModelUnavailable,
    "database_unavailable": DatabaseUnavailable,
    "broker_unavailable": BrokerUnavailable,
    "storage_unavailable": StorageFull,
    "too_many_jobs": TooManyJobs,
    "too_many_failures": TooManyFailures,
    "too_many_notifications": TooManyNotifications,
    "invalid_api_key": InvalidApiKey,
    "missing_api_key": MissingApiKey,
    "link_invalid": LinkInvalid,
    "link_expired": LinkExpired,
    "link_revoked": LinkRevoked,
    "invalid_option": InvalidOption,
    "invalid_audio": InvalidAudio,
    "decode_timeout": DecodeTimeout,
    "audio_too_long": AudioTooLong,
    "fetch_failed": FetchFailed,
    "model_not_multilingual": ModelNotMultilingual,
    "api_key_error": ApiKeyError,
    "empty_file": EmptyFile,
    "no_file": InvalidQuery,
    "no_filename": InvalidQuery,
    "no_url": InvalidQuery,
    "file_and_url": InvalidQuery,
    "invalid_json": InvalidQuery,
    "invalid_query": InvalidQuery,
    "invalid_value": InvalidQuery,
    "missing_parameter": InvalidQuery,
    "too_large": TooLarge,
    "body_timeout": BodyTimeout,
    "job_not_found": JobNotFound,
    "not_found": NotFound,
    "method_not_allowed": RequestError,
    "model_not_found": ModelNotFound,
    "unknown_format": UnknownFormat,
    "transcript_not_found": TranscriptNotFound,
    "expired": Expired,
    "not_ready": NotReady,
    "no_transcript": NoTranscript,
    "interrupted": JobInterrupted,
    "transcription_failed": TranscriptionFailed,
    "storage_full": StorageFull,
    "write_failed": WriteFailed,
}


def _by_status(status: int) -> type[ServiceError]:
    if status in (429, 503):
        return RetryLater
    if status in (401, 403):
        return AuthenticationError
    if status in (404, 410):
        return NotFound
    return RequestError if 400 <= status < 500 else ServerError


def error_for(status: int, body: object, retry_after: str | None) -> ServiceError:
    """The exception for an error answer: by its `code`, else by its HTTP status (a proxy's page has no code)."""
    fields = body if isinstance(body, dict) else {}
    code = str(fields.get("code") or f"http_{status}")
    message = str(fields.get("error") or f"HTTP {status}")
    kind = CODES.get(code) or _by_status(status)
    seconds: float | None = None
    if retry_after is not None and retry_after.strip().isdigit():
        seconds = float(retry_after.strip())
    return kind(message, code, status, fields, seconds)
