"""One window's decoding on the model thread: its kv-cache and attention, and its seeded sampler.

A WindowInference stands in for Whisper's kv-cached Inference inside a DecodingTask. The model
thread (batching.py) runs its forward passes among other windows'; attention runs on the window's
own cache, positions and prompt, exactly as when it is alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
import whisper
from torch import Tensor
from whisper.decoding import GreedyDecoder, Inference

log = logging.getLogger(__name__)


class StepRunner(Protocol):
    """What a window needs of the model thread (batching.ModelThread); named here, so neither imports the other."""

    def step(self, window: WindowInference, tokens: Tensor) -> Tensor:
        """The logits of `tokens` for this window, computed among other windows' steps."""

    def leave(self, window: WindowInference) -> None:
        """The window's task has ended: it takes no more steps."""


class WindowInference(Inference):
    """One window's kv-cache, its forward passes run by the model thread among other windows'."""

    def __init__(
        self,
        thread: StepRunner,
        decoder: whisper.model.TextDecoder,
        sot_index: int,
        check: Callable[[], None],
        *,
        urgent: bool = False,
    ) -> None:
        self._thread = thread
        self.urgent = urgent  # a live session's window: it joins the steps before file jobs' (batching.py)
        self._check = check  # raises to stop the window before its next step (a cancel, a stop)
        self._decoder = decoder
        self._sot_index = sot_index
        self.admitted = False  # taking part in the steps (set and cleared under the model thread's lock)
        self.length = 0  # tokens in the cache
        self.widest = 0  # most windows that shared one of its steps
        self.dtype = torch.float32
        self._rows = 0
        self._new = 0  # tokens per row in the pass being run
        self._read: list[int] = []  # the positions of those whose logits DecodingTask reads
        self.read_from: int | None = None  # on a pass with a draft: every position from here on is read too
        self._audio: Tensor | None = None
        self._self_kv: list[tuple[Tensor, Tensor]] = []
        self._cross_kv: list[tuple[Tensor, Tensor]] = []

    def logits(self, tokens: Tensor, audio_features: Tensor) -> Tensor:
        """Logits for the tokens not yet in the cache (all of them on the first call)."""
        if self._audio is None:
            # One window per task; best-of and beam rows all read the same audio.
            self._audio, self.dtype = audio_features[:1], audio_features.dtype
        self._rows, self._new = tokens.shape[0], tokens.shape[1] - self.length
        self._read = [0] if self._new == 1 else sorted({self._sot_index, self._new - 1})  # see read_positions
        if self.read_from is not None:  # a draft checked in one pass (drafts.py): the logits at each of its tokens
            self._read = sorted({*self._read, *range(self.read_from - self.length, self._new)})
        self._check()
        return self._thread.step(self, tokens[:, self.length :])

    def attend(self, index: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Self-attention of the new tokens over this window's cache, which they join."""
        n_head = self._decoder.blocks[index].attn.n_head
        key, value = _keys(self._rowwise(k), n_head), _heads(self._rowwise(v), n_head)
        if index < len(self._self_kv):
            previous_key, previous_value = self._self_kv[index]
            key, value = torch.cat([previous_key, key], dim=3), torch.cat([previous_value, value], dim=2)
            self._self_kv[index] = (key, value)
        else:
            self._self_kv.append((key, value))
        mask = None
        if self._new > 1:  # a prompt: each token sees the ones before it only (Whisper's causal mask)
            mask = self._decoder.mask[self.length : self.length + self._new, : self.length + self._new]
        return _attention(self._rowwise(q), key, value, n_head, mask).flatten(end_dim=1)

    def attend_audio(self, index: int, q: Tensor) -> Tensor:
        """Cross-attention of the new tokens over the window's audio."""
        cross = self._decoder.blocks[index].cross_attn
        if index == len(self._cross_kv):
            assert self._audio is not None
            self._cross_kv.append(
                (_keys(cross.key(self._audio), cross.n_head), _heads(cross.value(self._audio), cross.n_head))
            )
        key, value = self._cross_kv[index]
        # Every row reads the same audio: the rows' queries form one matrix against one cache.
        return _attention(q[None], key, value, cross.n_head)[0]

    def read_positions(self, hidden: Tensor) -> Tensor:
        """The hidden states DecodingTask reads logits of: the last token's, and the sot's on a prompt."""
        if self._new == 1:
            return hidden
        return self._rowwise(hidden)[:, self._read].flatten(end_dim=1)

    def logits_at_read_positions(self, logits: Tensor) -> Tensor:
        """(rows, new tokens, vocabulary) logits, set where DecodingTask reads them.

        On a prompt, DecodingTask reads the sot's logits (no-speech probability) and the last
        token's; projecting the other positions to the vocabulary would cost more than the
        decoder's layers, so they are left unset.
        """
        if self._new == 1:
            return logits[:, None]
        full = logits.new_empty(self._rows, self._new, logits.shape[-1])
        full[:, self._read] = logits.view(self._rows, len(self._read), -1)
        return full

    def _rowwise(self, x: Tensor) -> Tensor:
        return x.view(self._rows, -1, x.shape[-1])

    def truncate(self, length: int) -> None:
        """Forget the cached tokens from `length` on (a draft's tokens the model did not choose)."""
        self.length = length
        self._self_kv = [(key[..., :length], value[:, :, :length]) for key, value in self._self_kv]

    def rearrange_kv_cache(self, source_indices: list[int]) -> None:
        """Follow beam search's reordering of the rows (the audio is the same for all)."""
        if source_indices != list(range(len(source_indices))):
            self._self_kv = [(key[source_indices], value[source_indices]) for key, value in self._self_kv]

    def cleanup_caching(self) -> None:
        """Drop the caches and leave the steps (run() calls this when its loop ends)."""
        self._thread.leave(self)
        if self.widest:
            log.debug("decoded a window of %d tokens, up to %d windows per step", self.length, self.widest)
        self._self_kv, self._cross_kv, self._audio = [], [], None


class SeededSampler(GreedyDecoder):
    """Whisper's sampling decoder drawing from the window's own generator.

    Job threads sample at the same time, so torch's global generator would make a window's
    samples depend on its neighbours; its own, seeded by the window, does not.
    """

    def __init__(self, temperature: float, eot: int, seed: int) -> None:
        super().__init__(temperature, eot)
        self._generator = torch.Generator().manual_seed(seed)

    def update(self, tokens: Tensor, logits: Tensor, sum_logprobs: Tensor) -> tuple[Tensor, bool]:
        """GreedyDecoder.update with the sampling drawn from this window's generator."""
        probs = F.softmax(logits.float() / self.temperature, dim=-1)
        next_tokens = torch.multinomial(probs, 1, generator=self._generator)[:, 0]
        logprobs = F.log_softmax(logits.float(), dim=-1)
        current_logprobs = logprobs[torch.arange(logprobs.shape[0]), next_tokens]
        sum_logprobs += current_logprobs * (tokens[:, -1] != self.eot)
        next_tokens[tokens[:, -1] == self.eot] = self.eot
        tokens = torch.cat([tokens, next_tokens[:, None]], dim=-1)
        return tokens, bool((tokens[:, -1] == self.eot).all())


def _heads(x: Tensor, n_head: int) -> Tensor:
    """(rows, tokens, state) -> (rows, heads, tokens, state/heads), contiguous for the matmuls."""
    return x.view(*x.shape[:2], n_head, -1).permute(0, 2, 1, 3).contiguous()


def _keys(x: Tensor, n_head: int) -> Tensor:
    """Keys as (rows, heads, state/heads, tokens), scaled as Whisper scales them."""
    return (x.view(*x.shape[:2], n_head, -1).permute(0, 2, 3, 1) * (x.shape[-1] // n_head) ** -0.25).contiguous()


def _attention(q: Tensor, keys: Tensor, v: Tensor, n_head: int, mask: Tensor | None = None) -> Tensor:
    """MultiHeadAttention.qkv_attention's non-SDPA branch on cached, pre-scaled heads.

    Not SDPA: with one query per row (every step after the first) torch's CPU flash-attention
    kernel spent 20x the arithmetic's time (measured: 54 % of a batch's decoding).
    """
    qk = (q.view(*q.shape[:2], n_head, -1).permute(0, 2, 1, 3) * (q.shape[-1] // n_head) ** -0.25) @ keys
    if mask is not None:
        qk = qk + mask
    w = F.softmax(qk.float(), dim=-1).to(q.dtype)
    return (w @ v).permute(0, 2, 1, 3).flatten(start_dim=2)
