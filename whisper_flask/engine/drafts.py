"""Greedy decoding that checks a draft of its tokens in one forward pass, then goes on a token at a time.

A live session decodes its buffer again every half second (live_window.py), and most of each decode
repeats the last one's tokens, one decoder step each. Here the last decode's tokens are the draft:
they join the prompt in the first forward pass, and each is taken only if it is the token greedy
decoding chooses at its place, after Whisper's logit filters, as in DecodingTask's own loop. The
first token that differs ends the draft: the cache forgets the draft from there, and decoding goes on
one step at a time. So the result is greedy decoding's, in fewer steps (ARCHITECTURE.md, "Live
transcription").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from whisper.decoding import DecodingTask

from whisper_flask.engine.decoding import WindowInference


def drafted_main_loop(
    task: DecodingTask, draft: Sequence[int], audio_features: Tensor, tokens: Tensor
) -> tuple[Tensor, Tensor, list[float]]:
    """DecodingTask._main_loop for greedy decoding of one row, its first pass checking `draft`."""
    inference = task.inference
    assert isinstance(inference, WindowInference) and tokens.shape[0] == 1
    sum_logprobs = torch.zeros(1)
    no_speech_probs = [np.nan]
    begin = tokens.shape[1]
    draft = list(draft)[: task.sample_len - 1]
    try:
        inference.read_from = begin - 1
        logits = inference.logits(torch.cat([tokens, torch.tensor([draft], dtype=tokens.dtype)], dim=1), audio_features)
        inference.read_from = None
        if task.tokenizer.no_speech is not None:
            no_speech_probs = logits[:, task.sot_index].float().softmax(dim=-1)[:, task.tokenizer.no_speech].tolist()
        for offset in range(len(draft) + 1):
            tokens, completed = _choose(task, logits[:, begin - 1 + offset], tokens, sum_logprobs)
            if completed or offset == len(draft) or int(tokens[0, -1]) != draft[offset]:
                break
        # The cache holds the draft; it keeps the tokens before the last one chosen (fed by the next pass).
        inference.truncate(tokens.shape[1] - 1)
        while not completed and tokens.shape[1] - begin < task.sample_len and tokens.shape[1] <= task.n_ctx:
            tokens, completed = _choose(task, inference.logits(tokens, audio_features)[:, -1], tokens, sum_logprobs)
    finally:
        inference.cleanup_caching()
    return tokens, sum_logprobs, no_speech_probs


def _choose(task: DecodingTask, logits: Tensor, tokens: Tensor, sum_logprobs: Tensor) -> tuple[Tensor, bool]:
    """One step of DecodingTask's loop after the forward pass: the logit filters, then the decoder's choice."""
    logits = logits.clone()  # the filters write in place; the draft's other positions stay as computed
    for logit_filter in task.logit_filters:
        logit_filter.apply(logits, tokens)
    chosen: tuple[Tensor, bool] = task.decoder.update(tokens, logits, sum_logprobs)
    return chosen
