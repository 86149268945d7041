"""Language detection on an upload's first 30 s, for a request that waits for the answer."""

from __future__ import annotations

from pathlib import Path

from whisper_flask.audio.media import MediaDecoder
from whisper_flask.engine.engine import Engine
from whisper_flask.exceptions import NotMultilingual, ShuttingDown
from whisper_flask.jobs.ports import Registry
from whisper_flask.service.slots import RequestSlots


class LanguageDetection:
    """Detects languages at most MAX_DETECTIONS at a time; each stops when the service stops."""

    def __init__(self, engine: Engine, media: MediaDecoder, registry: Registry, slots: RequestSlots) -> None:
        self._engine = engine
        self._media = media
        self._registry = registry
        self._slots = slots

    def detect(self, path: Path) -> dict[str, float]:
        """Language probabilities of the first 30 s of a stored upload, which is then deleted."""
        try:
            if not self._engine.is_multilingual:
                raise NotMultilingual(f"the loaded model {self._engine.model_name} is English-only")
            with self._slots.held():
                info = self._media.probe(path, self._check_running)
                with self._media.decode(path, self._check_running, info.duration, first_seconds=30) as audio:
                    return self._engine.detect_language(audio)
        finally:
            path.unlink(missing_ok=True)

    def _check_running(self) -> None:
        if not self._registry.accepting:
            raise ShuttingDown("the service is stopping")
