"""Known speakers' voice samples (/v1's known_speaker_references[]): stored beside the job's upload, checked.

Each sample is written under a server-made name (Job.speaker_samples) and probed as every upload is;
one that is not audio, or is longer than MAX_SAMPLE_S, refuses the request naming the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from whisper_flask.audio.media import MediaDecoder
from whisper_flask.exceptions import InvalidOption, ServiceError
from whisper_flask.files import atomic_write

#: The longest voice sample taken, in seconds (OpenAI asks for 2 to 10 s; longer ones only cost time).
MAX_SAMPLE_S = 30.0
#: The field the samples come in.
FIELD = "known_speaker_references[]"


def store_samples(media: MediaDecoder, upload_dir: Path, names: Sequence[str], samples: Sequence[bytes]) -> None:
    """Write each sample to its name in upload_dir and probe it; InvalidOption (all removed) if one is refused."""
    paths = [upload_dir / name for name in names]
    try:
        for index, (path, sample) in enumerate(zip(paths, samples, strict=True), start=1):
            with atomic_write(path, "wb") as file:
                file.write(sample)
            try:
                duration = media.probe(path).duration
            except ServiceError as exc:
                raise InvalidOption(FIELD, f"sample {index} is not audio: {exc}") from exc
            if duration is None or duration > MAX_SAMPLE_S:
                raise InvalidOption(FIELD, f"sample {index} must be audio of at most {MAX_SAMPLE_S:.0f} s")
    except BaseException:
        for path in paths:
            path.unlink(missing_ok=True)
        raise
