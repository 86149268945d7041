"""A live buffer decoded as one short window: a decode that starts its text over is ended where the repeat begins."""

from __future__ import annotations

import math

import torch

from whisper_flask.engine.live_window import REPEAT_TOKENS, RepeatStop

EOT = 100
PROMPT = [101, 7, 102]  # what precedes the sampled tokens (the sot sequence, here with a prompt token)


def steps(repeats: RepeatStop, sampled: list[int]) -> torch.Tensor:
    """Run the filter as DecodingTask does, once per step, over `sampled`; the logits of the step after the last."""
    logits = torch.zeros(1, 110)
    for length in range(len(sampled) + 1):
        logits = torch.zeros(1, 110)
        repeats.apply(logits, torch.tensor([PROMPT + sampled[:length]]))
    return logits


def test_a_decode_that_starts_its_text_over_may_only_end_and_keeps_what_came_before() -> None:
    """Once six text tokens come a second time (timestamps aside), only the end of text may follow."""
    said = [105, 1, 2, 3, 4, 5, 6, 8, 106]  # a timestamp, text, a timestamp
    again = [107, 1, 2, 3, 4, 5, 6]
    repeats = RepeatStop(EOT)
    logits = steps(repeats, said + again)
    assert repeats.kept == len(said) + 1  # the repeat's first text token, after its timestamp
    assert logits[0, EOT] == 0 and bool((logits[0, :EOT] == -math.inf).all())
    assert bool((logits[0, EOT + 1 :] == -math.inf).all())


def test_one_word_said_over_and_over_is_cut_after_its_first_run() -> None:
    """The same token again and again is a repeat as soon as REPEAT_TOKENS + 1 of them have come."""
    repeats = RepeatStop(EOT)
    steps(repeats, [9] * (REPEAT_TOKENS + 1))
    assert repeats.kept == 1


def test_text_that_never_repeats_six_tokens_is_left_alone() -> None:
    """Speech that repeats shorter runs ("of the ... of the") keeps every token and its logits."""
    sampled = [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 8]
    repeats = RepeatStop(EOT)
    logits = steps(repeats, sampled)
    assert repeats.kept is None
    assert bool((logits == 0).all())
