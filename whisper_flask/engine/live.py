"""One live session's audio turned into text as it arrives: partial text that may change, final text that will not.

Silero VAD hears each 32 ms of audio as it arrives. While someone speaks, the buffer since the start of
their utterance is decoded again every STEP_S of new audio (live_window.py, on the shared model thread),
and words two successive decodes agree on are final once they end HOLD_S before the buffer's end
(agreement.py). A pause of PAUSE_S ends the utterance: its last decode is final as a whole and the buffer
starts afresh, so silence costs no model time and the buffer stays short. A buffer in which the detector
heard no speech is never decoded (ARCHITECTURE.md, "Live transcription").
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from whisper.audio import SAMPLE_RATE

from whisper_flask.engine.agreement import LocalAgreement, Word, without_copies, without_repeated_end
from whisper_flask.engine.live_window import Hypothesis

#: New audio, while speech goes on, that makes the next decode (the floor of a partial's delay).
STEP_S = 0.5
#: The most new audio one decode takes in (a session catching up after the model was busy). Each decode of
#: a backlog pays a whole encoder pass, so fewer, longer pieces catch up sooner: 4 sessions beside a file job
#: (bench/live.py, AVX2-only AMD EPYC) had partial p90 4.5 to 7.5 s with 2 s pieces, 3.1 to 4.4 s with 6 s.
MAX_PIECE_S = 6.0
#: Words ending this close to the buffer's end stay tentative even when two decodes agree on them: Whisper
#: revises the last second of a short buffer most. Fed in-process at real-time pace (`base`, AVX2-only AMD
#: EPYC), word error rates with 0 / 1.0 / 1.5 s: 97 short utterances 7.8 / 7.0 / 5.8 %, the 232 s LJ Speech
#: recording 8.5 / 7.0 / 8.7 %, the 70 s chapter 2.4 / 1.8 / 1.8 %. 1 s delayed final text 0.55 s (p50, bench/live.py).
HOLD_S = 1.0
#: Silence after speech that ends an utterance (its text final at once).
PAUSE_S = 0.5
#: Audio kept from before speech starts: the detector hears a word's onset late.
PREROLL_S = 0.4
#: A longer buffer is cut at its last segment whose words are all final: what is final leaves the buffer for
#: the prompt, so each decode reads only the speech since (bench/live.py: 12 s kept one session's decodes
#: too slow to keep up with 4).
TRIM_S = 4.0
#: A longer one (no final segment end in it) is made final whole: a window holds 30 s at most.
MAX_BUFFER_S = 24.0
#: Confirmed text, its last characters, is the prompt of every decode (as whisper_streaming does).
PROMPT_CHARS = 200
#: Silero's thresholds for entering and leaving speech (its defaults).
SPEECH, NON_SPEECH = 0.5, 0.35
FRAME = 512  # samples per detector frame at 16 kHz

#: Decodes a buffer after a prompt (LiveDecoder.hypothesis with the session's language and task).
Decode = Callable[[np.ndarray, str], Hypothesis]


class LiveEventKind(enum.Enum):
    """What a live stream reports."""

    SPEECH_STARTED = "speech_started"
    SPEECH_STOPPED = "speech_stopped"
    PARTIAL = "partial"  # the tentative text after the final text so far; replaces the last partial
    FINAL = "final"  # text that follows the last final text and will not change


@dataclass(frozen=True)
class LiveEvent:
    """A live stream's report; times in seconds from the stream's first sample."""

    kind: LiveEventKind
    start: float
    end: float
    text: str = ""


class LiveStream:
    """A live session's buffer, detector state and text; fed audio by one thread (the session's)."""

    def __init__(self, decode: Decode, detector: torch.nn.Module, *, commit_on_pause: bool = True) -> None:
        self._decode = decode
        self._detector = detector  # a copy of Silero's model: it keeps this stream's state
        self._commit_on_pause = commit_on_pause  # a pause ends the utterance (else only commit() does)
        self._buffer = np.zeros(0, np.float32)
        self._buffer_start = 0  # the buffer's first sample, counted from the stream's start
        self._heard = 0  # samples received
        self._decoded_at = 0  # samples received at the last decode
        self._unheard = np.zeros(0, np.float32)  # samples the detector has not heard (under a frame)
        self._speaking = False
        self._quiet = 0  # samples of silence since speech, while speaking
        self._last_speech = 0  # where the detector last heard speech (a frame's end)
        self._speech_since: int | None = None  # where the utterance being decoded began
        self._agreement = LocalAgreement()
        self._context = (
            ""  # final text whose audio has left the buffer: the prompt (Whisper takes it as what came before)
        )
        self._partial = ""

    @property
    def seconds(self) -> float:
        """Audio received so far."""
        return self._heard / SAMPLE_RATE

    def feed(self, samples: np.ndarray) -> list[LiveEvent]:
        """Take 16 kHz float samples; what they make known (decodes run here when due).

        Audio that piled up while the model was busy is heard MAX_PIECE_S at a time, each piece decoded once:
        a session behind decodes less often per second of audio (each piece is longer), which is what lets it
        catch up, and the buffer never grows past what a decode can trim.
        """
        events: list[LiveEvent] = []
        piece = int(MAX_PIECE_S * SAMPLE_RATE)
        for start in range(0, len(samples), piece):
            events += self._feed(samples[start : start + piece])
        return events

    def _feed(self, samples: np.ndarray) -> list[LiveEvent]:
        self._buffer = np.concatenate([self._buffer, samples])
        self._heard += len(samples)
        events = self._listen(samples)
        due = self._speech_since is not None and self._heard - self._decoded_at >= STEP_S * SAMPLE_RATE
        if due and self._speech_left():
            events += self._update()
        elif self._speech_since is None:
            self._cut(self._heard - int(PREROLL_S * SAMPLE_RATE))
        return events

    def commit(self) -> list[LiveEvent]:
        """Make everything heard final now (the end of the stream, or a client's commit)."""
        events = self._end_utterance(self._heard)
        if self._speaking:
            self._speaking = False
            events.append(LiveEvent(LiveEventKind.SPEECH_STOPPED, self.seconds, self.seconds))
        return events

    def clear(self) -> None:
        """Drop the audio and the tentative text not yet final."""
        self._restart(self._heard)
        self._speech_since = self._heard if self._speaking else None  # speech going on is heard from here
        self._partial = ""

    def _listen(self, samples: np.ndarray) -> list[LiveEvent]:
        """The detector's verdict on each whole frame: speech starting, or a pause long enough to end it."""
        audio = np.concatenate([self._unheard, samples])
        whole = len(audio) // FRAME * FRAME
        self._unheard = audio[whole:]
        first = self._heard - len(audio)  # the sample `audio` starts at
        events: list[LiveEvent] = []
        with torch.no_grad():
            for at in range(0, whole, FRAME):
                probability = float(self._detector(torch.from_numpy(audio[at : at + FRAME]), SAMPLE_RATE))
                end = first + at + FRAME
                if probability >= SPEECH or (self._speaking and probability >= NON_SPEECH):
                    self._last_speech = end  # frames between the thresholds still count as speech once in it
                if probability >= SPEECH:
                    self._quiet = 0
                    if not self._speaking:
                        self._speaking = True
                        start = max(self._buffer_start, end - FRAME - int(PREROLL_S * SAMPLE_RATE))
                        self._speech_since = start if self._speech_since is None else self._speech_since
                        events.append(LiveEvent(LiveEventKind.SPEECH_STARTED, start / SAMPLE_RATE, start / SAMPLE_RATE))
                elif self._speaking and probability < NON_SPEECH:
                    self._quiet += FRAME
                    if self._quiet >= PAUSE_S * SAMPLE_RATE:
                        self._speaking = False
                        if self._commit_on_pause:
                            events += self._end_utterance(end)
                        stopped = (end - self._quiet) / SAMPLE_RATE
                        events.append(LiveEvent(LiveEventKind.SPEECH_STOPPED, stopped, stopped))
        return events

    def _update(self) -> list[LiveEvent]:
        """Decode the buffer again: the words it confirms are final, the rest partial."""
        hypothesis = self._hypothesis(len(self._buffer))
        until = (self._buffer_start + len(self._buffer)) / SAMPLE_RATE - HOLD_S
        events = self._final(self._agreement.confirm(list(hypothesis.words), until=until))
        if len(self._buffer) > TRIM_S * SAMPLE_RATE:
            done = [end for end in hypothesis.segment_ends if end <= self._agreement.confirmed_until + 1e-6]
            if done:
                self._cut(int(done[-1] * SAMPLE_RATE))
            elif len(self._buffer) > MAX_BUFFER_S * SAMPLE_RATE:
                events += self._final(self._agreement.confirm(list(hypothesis.words), everything=True))
                self._restart(self._heard)
        return events + self._tentative()

    def _end_utterance(self, upto: int) -> list[LiveEvent]:
        """The utterance's audio up to sample `upto`, decoded once more and final as a whole.

        Not decoded when the detector heard no speech in the buffer (a trim cut it at a final segment's end, and
        only silence is left): the tentative words are then final as they stand.
        """
        events: list[LiveEvent] = []
        if self._speech_since is not None:
            words = self._hypothesis(upto - self._buffer_start).words if self._speech_left() else ()
            events = self._final(self._agreement.confirm(list(words), everything=True))
            self._restart(upto - int(PREROLL_S * SAMPLE_RATE))
            events += self._tentative()
        self._speech_since = None
        self._cut(upto - int(PREROLL_S * SAMPLE_RATE))
        return events

    def _speech_left(self) -> bool:
        """Whether the detector heard speech in the buffer.

        Given only silence after its prompt, Whisper writes words of its own or the prompt's again ("I'm sorry.",
        "She was sleeping under"): before HOLD_S, the pause left alone after a trim was decoded so, and the
        Kathleen recording fed in-process at real-time pace (`base`, AVX2-only AMD EPYC) scored 6.9 % word error
        rate with those decodes, 2.8 % without (2.2 % as a file through the service).
        """
        return self._last_speech > self._buffer_start

    def _hypothesis(self, samples: int) -> Hypothesis:
        """The first `samples` of the buffer decoded, its words' times moved to the stream's clock."""
        self._decoded_at = self._heard
        found = self._decode(self._buffer[:samples], self._context)
        offset = self._buffer_start / SAMPLE_RATE
        kept = without_repeated_end(without_copies(list(found.words), self._context))
        words = tuple(Word(word.text, word.start + offset, word.end + offset) for word in kept)
        return Hypothesis(words, tuple(end + offset for end in found.segment_ends))

    def _final(self, words: list[Word]) -> list[LiveEvent]:
        if not words:
            return []
        text = "".join(word.text for word in words)
        return [LiveEvent(LiveEventKind.FINAL, words[0].start, words[-1].end, text)]

    def _tentative(self) -> list[LiveEvent]:
        """A partial event when the tentative text changed."""
        words = self._agreement.tentative
        text = "".join(word.text for word in words)
        if text == self._partial:
            return []
        self._partial = text
        start, end = (words[0].start, words[-1].end) if words else (self.seconds, self.seconds)
        return [LiveEvent(LiveEventKind.PARTIAL, start, end, text)]

    def _cut(self, sample: int) -> None:
        """Drop the buffer's audio before `sample` (counted from the stream's start)."""
        drop = min(max(0, sample - self._buffer_start), len(self._buffer))
        self._buffer = self._buffer[drop:]
        self._buffer_start += drop
        self._remember(self._agreement.cut(self._buffer_start / SAMPLE_RATE))

    def _restart(self, sample: int) -> None:
        """The buffer from `sample` on, its confirmed words all gone from it."""
        self._remember(self._agreement.restart())
        self._cut(sample)

    def _remember(self, words: list[Word]) -> None:
        """Final words whose audio left the buffer become the prompt's end."""
        self._context = (self._context + "".join(word.text for word in words))[-PROMPT_CHARS:]
