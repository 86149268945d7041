"""Decoding windows from several jobs as one batch, through Whisper's own DecodingTask.

Whisper's decoder takes a batch of windows but gives every row the same prompt, and each
window of a transcription is conditioned on its own previous text. Rows are therefore
left-padded to one length: each row's positions start at 0 after its padding and no row
attends to padding, so a row decodes as it would alone. The task, logit filters, greedy
decoder and ranking are Whisper's; only the initial rows and the kv-cached forward pass
(the Inference object) are replaced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
import whisper
from torch import Tensor
from whisper.decoding import BeamSearchDecoder, DecodingOptions, DecodingResult, DecodingTask, Inference

#: Hidden states -> vocabulary logits (the transposed token embedding, in fp32 or int8).
Projection = Callable[[Tensor], Tensor]


def whisper_projection(model: whisper.Whisper) -> Projection:
    """The logits projection exactly as Whisper's TextDecoder computes it."""
    weight = model.decoder.token_embedding.weight

    def project(x: Tensor) -> Tensor:
        return (x @ torch.transpose(weight.to(x.dtype), 0, 1)).float()

    return project


def _is_encoded(model: whisper.Whisper, mel: Tensor) -> bool:
    """Whether `mel` already holds the encoder's output for its window."""
    return tuple(mel.shape[-2:]) == (model.dims.n_audio_ctx, model.dims.n_audio_state)


@torch.no_grad()
def decode_windows(
    model: whisper.Whisper,
    windows: Sequence[Tensor],
    prompts: Sequence[Sequence[int] | str | None],
    options: DecodingOptions,
    project: Projection,
) -> list[DecodingResult]:
    """Decode windows (mel or encoded) that share `options` except each one's prompt."""
    task = _BatchTask(model, options, prompts, project)
    mels = [i for i, window in enumerate(windows) if not _is_encoded(model, window)]
    features = list(windows)
    if mels:
        # One encoder pass for the windows not encoded before (a temperature fallback reuses its own).
        encoded = task._get_audio_features(torch.stack([windows[i] for i in mels]))
        for i, row in zip(mels, encoded, strict=True):
            features[i] = row
    return task.run(torch.stack(features))


class _BatchTask(DecodingTask):
    """Whisper's DecodingTask with one initial row per window, left-padded to the longest."""

    def __init__(
        self,
        model: whisper.Whisper,
        options: DecodingOptions,
        prompts: Sequence[Sequence[int] | str | None],
        project: Projection,
    ) -> None:
        # Whisper's own rule for a prompt's initial tokens (trimmed, sot_prev first) for each row.
        rows = [DecodingTask(model, dataclasses.replace(options, prompt=p)).initial_tokens for p in prompts]
        # This task is the longest row's, so sample_begin and sot_index (and the filters that
        # use them) hold for every row once the others are padded on the left.
        longest = max(range(len(rows)), key=lambda i: len(rows[i]))
        super().__init__(model, dataclasses.replace(options, prompt=prompts[longest]))
        pad = self.tokenizer.sot_prev  # never EOT: run() slices each row up to its first EOT
        width = len(self.initial_tokens)
        self._rows = torch.tensor([(pad,) * (width - len(row)) + tuple(row) for row in rows])
        pads = torch.tensor([width - len(row) for row in rows])
        self.inference = _PaddedInference(model, pads, project)
        if isinstance(self.decoder, BeamSearchDecoder):
            self.decoder.inference = self.inference  # it kept a reference to the one replaced

    def _detect_language(self, audio_features: Tensor, tokens: Tensor) -> Any:
        # run() builds every row from one initial sequence; this is its one step between building
        # the rows and decoding them, so each row gets its own prompt here.
        tokens[:] = self._rows.to(tokens.device)
        return super()._detect_language(audio_features, tokens)


class _PaddedInference(Inference):
    """Whisper's kv-cached decoder forward pass, for rows with left padding.

    It mirrors TextDecoder and MultiHeadAttention (without SDPA) operation by operation, with
    keys cached pre-transposed for the matmul: a window alone gives Whisper's tokens, and its
    scores differ from Whisper's in the last bits (matmul summation order).
    """

    def __init__(self, model: whisper.Whisper, pads: Tensor, project: Projection) -> None:
        self._decoder = model.decoder
        self._pads = pads
        self._project = project
        self._length = 0  # tokens already in the cache
        self._self_kv: list[tuple[Tensor, Tensor]] = []
        self._cross_kv: list[tuple[Tensor, Tensor]] = []

    def logits(self, tokens: Tensor, audio_features: Tensor) -> Tensor:
        """Logits for the tokens not yet in the cache (all of them on the first call)."""
        decoder = self._decoder
        rows, length = tokens.shape
        if not self._cross_kv:
            # Beam search and best-of repeat each window's rows; the pads follow them.
            self._pads = self._pads.repeat_interleave(rows // len(self._pads)).to(tokens.device)
            audio = audio_features.repeat_interleave(rows // audio_features.shape[0], dim=0)
            self._cross_kv = [
                (
                    _keys(b.cross_attn.key(audio), b.cross_attn.n_head),
                    _heads(b.cross_attn.value(audio), b.cross_attn.n_head),
                )
                for b in decoder.blocks
            ]
        start = self._length
        positions = torch.arange(start, length, device=tokens.device)
        x = decoder.token_embedding(tokens[:, start:])
        x = x + decoder.positional_embedding[(positions[None, :] - self._pads[:, None]).clamp(min=0)]
        x = x.to(audio_features.dtype)

        mask = None
        padded = bool(self._pads.any())
        if padded or length - start > 1:  # one new token per unpadded row sees the whole cache
            keys = torch.arange(length, device=tokens.device)[None, None, :]
            seen = keys <= positions[None, :, None]
            if padded:
                # A padding row attends to itself so it stays finite; no real row attends to it.
                seen = (seen & (keys >= self._pads[:, None, None])) | (keys == positions[None, :, None])
            mask = torch.zeros(seen.shape, dtype=x.dtype, device=x.device).masked_fill_(~seen, float("-inf"))[:, None]

        for index, block in enumerate(decoder.blocks):
            attn = block.attn
            h = block.attn_ln(x)
            key, value = _keys(attn.key(h), attn.n_head), _heads(attn.value(h), attn.n_head)
            if index < len(self._self_kv):
                previous_key, previous_value = self._self_kv[index]
                key, value = torch.cat([previous_key, key], dim=3), torch.cat([previous_value, value], dim=2)
                self._self_kv[index] = (key, value)
            else:
                self._self_kv.append((key, value))
            x = x + attn.out(_attention(attn.query(h), key, value, attn.n_head, mask))
            cross = block.cross_attn
            cross_key, cross_value = self._cross_kv[index]
            x = x + cross.out(_attention(cross.query(block.cross_attn_ln(x)), cross_key, cross_value, cross.n_head))
            x = x + block.mlp(block.mlp_ln(x))
        self._length = length
        return self._project(decoder.ln(x))

    def rearrange_kv_cache(self, source_indices: list[int]) -> None:
        """Follow beam search's reordering of the rows."""
        if source_indices != list(range(len(source_indices))):
            self._self_kv = [(key[source_indices], value[source_indices]) for key, value in self._self_kv]
            self._cross_kv = [(key[source_indices], value[source_indices]) for key, value in self._cross_kv]
            self._pads = self._pads[source_indices]

    def cleanup_caching(self) -> None:
        """Drop the caches (run() calls this when the loop ends)."""
        self._self_kv, self._cross_kv, self._length = [], [], 0


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
