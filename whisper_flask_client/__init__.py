"""A client for whisper_flask's HTTP API: the `whisper-flask transcribe` command and the typed `Client` it uses.

It depends on the HTTP API only and imports nothing from the server's package: it runs on other machines.
"""

from __future__ import annotations

from whisper_flask_client.api import Client, Job, JobState, Options, Transcript
from whisper_flask_client.errors import ServiceError

__all__ = ["Client", "Job", "JobState", "Options", "ServiceError", "Transcript"]
