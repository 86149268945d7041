"""One job's proxy of the shared model: Whisper's loop calls it as its model, the model thread does the work.

ARCHITECTURE.md, "The engine", says why: openai-whisper's model is not thread-safe, so each job's
loop talks to this proxy, which reports each window, swaps a resumed job's prompt back, and hands
every model call to the one model thread.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
from types import FrameType
from typing import Any

import torch
import whisper

from whisper_flask.engine.batching import ModelThread
from whisper_flask.engine.windows import StepCheck, Window, WindowHook

log = logging.getLogger(__name__)

#: A resumed job's (re-encoded initial_prompt, exact tokens it stands for); empty when fresh.
PromptSwap = tuple[list[int], list[int]]

#: The function whose frame the proxy reads `seek` and `all_segments` from (internals.py checks them).
_TRANSCRIBE_CODE = whisper.transcribe.__code__


def _transcribe_loop() -> dict[str, Any]:
    """The local variables of the running ``whisper.transcribe`` (its seek and segments)."""
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        if frame.f_code is _TRANSCRIBE_CODE:
            return frame.f_locals
        frame = frame.f_back
    return {}


class JobModel:
    """One job's view of the shared model: every model call goes to the model thread."""

    def __init__(
        self,
        model: whisper.Whisper,
        thread: ModelThread,
        on_window: WindowHook,
        check: StepCheck,
        prompt_swap: PromptSwap,
        aligns: bool,
    ) -> None:
        self._model = model
        self._thread = thread
        self._on_window = on_window
        self._check = check
        self._canonical, self._exact = prompt_swap
        self._aligns = aligns
        self._encoded: tuple[torch.Tensor, torch.Tensor] | None = None  # (mel, its encoder output)
        self._last_seek = -1  # where the loop's last window started

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def decode(self, mel: torch.Tensor, options: whisper.DecodingOptions) -> Any:
        prompt = list(options.prompt or [])
        if self._canonical and prompt[: len(self._canonical)] == self._canonical:
            # A resumed job: its initial_prompt stands for the exact tokens (timestamps included)
            # that the interrupted run was conditioned on, until Whisper resets its prompt.
            prompt = self._exact + prompt[len(self._canonical) :]
            options = dataclasses.replace(options, prompt=prompt)
        loop = _transcribe_loop()
        window = Window(loop.get("seek", 0), list(loop.get("all_segments", [])), prompt, options.language)
        # Report and allow cancellation before waiting for the model, never while holding it.
        self._thread.release()
        self._on_window(window)
        # transcribe() passes the same mel tensor to each temperature of a fallback.
        stalled = False
        if self._encoded is None or self._encoded[0] is not mel:
            # A new window where the last one started: the loop did not move on, which it never will. A window whose
            # last timestamp pair is <|0.00|> moves its seek by 0 (openai/whisper#2005, whisperX#174), so the loop
            # would decode it for ever (the sampler is seeded by the seek). It is skipped as Whisper skips silence.
            stalled, self._last_seek = window.seek == self._last_seek, window.seek
            self._encoded = (mel, self._thread.run(lambda: self._model.encoder(mel[None])))
        result = self._thread.decode(self._encoded[1], options, window.seek, self._check)
        if stalled:
            log.warning("Whisper's loop stood still at frame %d of its span: that window is skipped", window.seek)
            # As no speech: the loop neither falls back to another temperature nor keeps the window's text.
            return dataclasses.replace(result, no_speech_prob=1.0, avg_logprob=-math.inf)
        if self._aligns:
            # Word alignment follows: it flips a global SDPA switch and hooks shared modules
            # before its forward pass, so it must have the model from now until its next decode.
            self._thread.reserve()
        return result

    def detect_language(self, mel: torch.Tensor, tokenizer: Any = None) -> Any:
        return self._thread.run(lambda: self._model.detect_language(mel, tokenizer))

    def __call__(self, mel: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        self._thread.reserve()  # reserved since the decode; see there
        return self._thread.run(lambda: self._model(mel, tokens))
