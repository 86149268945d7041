"""A live session's buffer decoded as one window on the shared model thread, ahead of file jobs.

The buffer (at most a few tens of seconds) is padded to Whisper's 30 s window, encoded and decoded
greedily with timestamps, conditioned on the session's confirmed text; its segments become words with
times estimated within each segment (ARCHITECTURE.md, "Live transcription").
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import whisper
from whisper.audio import FRAMES_PER_SECOND, HOP_LENGTH, N_FRAMES, SAMPLE_RATE
from whisper.decoding import LogitFilter
from whisper.model import AudioEncoder

from whisper_flask.engine.agreement import Word
from whisper_flask.engine.batching import ModelThread
from whisper_flask.engine.options import Task

#: Whisper's own rules for a window it would drop: no speech, or text repeating itself.
NO_SPEECH = 0.6
LOW_LOGPROB = -1.0
MAX_COMPRESSION = 2.4
#: A timestamp token's step, in seconds.
TIME_STEP = 0.02
#: Silence encoded after the buffer: Whisper was trained on windows that end in silence or more speech.
CONTEXT_MARGIN_S = 2.0
#: The most tokens a second of audio may be decoded into (timestamps included).
TOKENS_PER_S = 8
#: Text tokens that, once they appear a second time in one decode, end it (RepeatStop).
REPEAT_TOKENS = 6
#: A buffer whose first samples (0.1 s) and prompt are the last decode's is that buffer grown: the last
#: decode's tokens are this one's draft (drafts.py).
SAME_START = 1600
#: A session given no language keeps the language heard once Whisper gives it this probability in a buffer of
#: SURE_LANGUAGE_AFTER_S or more; until then each decode is in the likeliest language of its buffer (one decoder pass
#: of a token more a decode, in the encoder's call). Streamed at real-time pace (bench/live_accuracy.py --sets nonen;
#: base, AVX2-only AMD EPYC), 2 of 13 non-English recordings kept their language when the first buffer (about 0.5 s)
#: decided; heard on each recording's first 1 to 6 s, the likeliest language was wrong only below 0.7; 0.7 alone kept
#: 11 of 13 (a Spanish buffer of 1 s was heard as Arabic with 0.84, a Swedish one as Norwegian); with the 2 s, chosen
#: from that Spanish recording, 13 of 13.
SURE_LANGUAGE = 0.7
SURE_LANGUAGE_AFTER_S = 2.0
_WORDS = re.compile(r"\s*\S+")


@dataclass(frozen=True)
class Hypothesis:
    """One decode of a buffer: its words and the ends of its finished segments, in seconds from the buffer's start."""

    words: tuple[Word, ...]
    segment_ends: tuple[float, ...]


class LiveDecoder:
    """Decodes one live session's buffers on the loaded model, in the language given or, until Whisper is sure of one
    (SURE_LANGUAGE), in the likeliest it hears in each buffer."""

    def __init__(
        self, model: whisper.Whisper, thread: ModelThread, language: str | None, task: Task, *, encoder: AudioEncoder
    ) -> None:
        self._model = model
        self._encoder = encoder  # not the model's where file jobs' runs int8-fbgemm: live text loses words to it
        self._thread = thread
        self._language = language if model.is_multilingual else "en"
        self._task = task
        # The last decode's start, prompt, language and tokens: its draft for a buffer that has only grown.
        self._last: tuple[np.ndarray, str, str | None, list[int]] | None = None

    @property
    def language(self) -> str | None:
        """The session's language: the one given, or the one kept once heard (None until then)."""
        return self._language

    def __call__(self, audio: np.ndarray, prompt: str) -> Hypothesis:
        """Decode `audio` (16 kHz float samples, under 30 s) after `prompt`: its words (none if Whisper hears none)."""
        features, heard = self._encode(audio)
        language = self._language
        if heard is not None:
            language, probability = heard
            if probability >= SURE_LANGUAGE and len(audio) >= SURE_LANGUAGE_AFTER_S * SAMPLE_RATE:
                self._language = language
        options = whisper.DecodingOptions(
            task=self._task.value,
            language=language,
            temperature=0.0,
            prompt=prompt or None,
            fp16=False,
            # Speech is a few tokens a second: a window repeating itself stops soon, not at 224 tokens.
            sample_len=min(224, int(TOKENS_PER_S * len(audio) / SAMPLE_RATE) + 16),
        )
        tokenizer = whisper.tokenizer.get_tokenizer(
            self._model.is_multilingual,
            num_languages=self._model.num_languages,
            language=language,
            task=self._task.value,
        )
        repeats = RepeatStop(tokenizer.eot)
        start = audio[:SAME_START]
        last = self._last
        same = last is not None and last[1:3] == (prompt, language) and np.array_equal(last[0], start)
        draft = last[3] if last is not None and same else []
        # greedy: the seed is unused
        result = self._thread.decode(features, options, seed=0, urgent=True, logit_filter=repeats, draft=draft)
        tokens = result.tokens[: repeats.kept]
        self._last = (start.copy(), prompt, language, tokens)
        text = tokenizer.decode([token for token in tokens if token < tokenizer.eot])
        if result.no_speech_prob > NO_SPEECH and result.avg_logprob < LOW_LOGPROB:
            return Hypothesis((), ())
        if text and len(text.encode()) / len(zlib.compress(text.encode())) > MAX_COMPRESSION:
            return Hypothesis((), ())
        return parse_tokens(tokens, tokenizer, len(audio) / SAMPLE_RATE)

    def _encode(self, audio: np.ndarray) -> tuple[torch.Tensor, tuple[str, float] | None]:
        """The encoder's output for the audio and CONTEXT_MARGIN_S of silence after it (not a whole 30 s window), and
        the language heard in it while the session has none (heard_language)."""
        frames = min(N_FRAMES, 2 * math.ceil((len(audio) / SAMPLE_RATE + CONTEXT_MARGIN_S) * FRAMES_PER_SECOND / 2))
        padding = frames * HOP_LENGTH - len(audio)
        mel = whisper.log_mel_spectrogram(torch.from_numpy(audio), self._model.dims.n_mels, padding=padding)
        mel = mel[:, :frames].to(self._model.device)
        hear = self._language is None

        def encode() -> tuple[torch.Tensor, tuple[str, float] | None]:
            # One trip to the model thread for both: a second urgent call could wait behind a file job's step.
            features = encode_short(self._encoder, mel[None])
            return features, heard_language(self._model, features) if hear else None

        return self._thread.run(encode, urgent=True)


class RepeatStop(LogitFilter):
    """Ends a decode whose text starts over, and says where the repeat began (`kept` tokens precede it).

    Given a few seconds of audio, Whisper often transcribes it and then starts again from its first
    word, or says one word again and again, until the token limit: on the LJSpeech chapter fed a frame
    at a time (base, int8; AMD EPYC, 2 cores), 36 decodes of 140 did, taking up to 0.9 s instead of
    0.3 s, clearing the partial text and twice confirming repeated words as final. Once the last
    REPEAT_TOKENS text tokens already appeared in this decode, only the end of text may follow; speech
    seldom says six tokens twice within one buffer of a few seconds.
    """

    def __init__(self, eot: int) -> None:
        self._eot = eot
        self._begin: int | None = None  # where the sampled tokens begin (the first call sees none yet)
        self.kept: int | None = None  # sampled tokens before the repeat (None: no repeat, keep all)

    def apply(self, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        """Allow only the end of text once the row's last REPEAT_TOKENS text tokens are a repeat (greedy: one row)."""
        if self._begin is None:
            self._begin = tokens.shape[1]
        if self.kept is None:
            sampled = tokens[0, self._begin :].tolist()
            positions = [at for at, token in enumerate(sampled) if token < self._eot]
            text, n = [sampled[at] for at in positions], REPEAT_TOKENS
            if len(text) > n and any(text[at : at + n] == text[-n:] for at in range(len(text) - n)):
                self.kept = positions[-n]
        if self.kept is not None:
            logits[:, : self._eot] = -math.inf
            logits[:, self._eot + 1 :] = -math.inf


def heard_language(model: whisper.Whisper, features: torch.Tensor) -> tuple[str, float]:
    """The language whose token Whisper puts first after the start of a transcript, given a buffer's features, and
    its probability among the languages.

    whisper.detect_language would take features of fewer than 1500 frames (encode_short's) for a spectrogram and
    run the file jobs' encoder on them; this is its decoder half.
    """
    tokenizer = whisper.tokenizer.get_tokenizer(model.is_multilingual, num_languages=model.num_languages)
    logits = model.logits(torch.tensor([[tokenizer.sot]], device=features.device), features)[0, -1]
    probabilities = logits[list(tokenizer.all_language_tokens)].float().softmax(-1)
    likeliest = int(probabilities.argmax())
    return str(tokenizer.all_language_codes[likeliest]), float(probabilities[likeliest])


def encode_short(encoder: AudioEncoder, mel: torch.Tensor) -> torch.Tensor:
    """AudioEncoder.forward on fewer than 3000 frames: the positional embedding's first rows only.

    Whisper's encoder takes exactly 30 s; the cost is in proportion to the frames, and a live buffer
    is a few seconds. On `base`, 6 s of speech and 2 s of silence encoded in 0.16 s against 0.87 s for
    the padded window, with the same text (AMD EPYC, 2 threads); without the margin Whisper sometimes
    repeats itself at the end.
    """
    x = F.gelu(encoder.conv1(mel))
    x = F.gelu(encoder.conv2(x)).permute(0, 2, 1)
    x = (x + encoder.positional_embedding[: x.shape[1]]).to(x.dtype)
    for block in encoder.blocks:
        x = block(x)
    result: torch.Tensor = encoder.ln_post(x)
    return result


def parse_tokens(tokens: list[int], tokenizer: whisper.tokenizer.Tokenizer, duration: float) -> Hypothesis:
    """Segments between Whisper's timestamp tokens, as words; a segment left open ends at `duration`."""
    words: list[Word] = []
    ends: list[float] = []
    start: float | None = None
    text: list[int] = []
    for token in tokens:
        if token < tokenizer.timestamp_begin:
            if token < tokenizer.eot:
                text.append(token)
                start = (ends[-1] if ends else 0.0) if start is None else start
            continue
        time = min((token - tokenizer.timestamp_begin) * TIME_STEP, duration)
        if start is not None and text:
            words += _spread(tokenizer.decode(text), start, time)
            ends.append(time)
            start, text = None, []
        else:
            start = time
    if start is not None and text:
        words += _spread(tokenizer.decode(text), start, max(start, duration))
    return Hypothesis(tuple(words), tuple(ends))


def _spread(text: str, start: float, end: float) -> list[Word]:
    """The segment's words, each given a share of its time in proportion to its letters."""
    pieces = _WORDS.findall(text)
    letters = sum(len(piece.strip()) for piece in pieces) or 1
    words, at = [], start
    for piece in pieces:
        length = (end - start) * len(piece.strip()) / letters
        words.append(Word(piece, round(at, 3), round(at + length, 3)))
        at += length
    return words
