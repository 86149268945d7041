"""The openai-whisper internals the engine relies on, checked at start-up.

The engine reads the running transcribe loop's locals (progress and resume), swaps members of
DecodingTask (step batching), walks the decoder's modules (the model thread's forward pass) and
reads private tables (alignment heads, download URLs) and hands transcribe a precomputed
spectrogram (spectrogram.py). An upgrade of openai-whisper that renames
any of them must stop the service with a clear message, never zero the progress or the resume
silently (ARCHITECTURE.md, "The engine").
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
import whisper
from whisper import decoding, model

from whisper_flask.exceptions import WhisperIncompatible


def _sets(cls: type, *names: str) -> Callable[[], bool]:
    """True when cls.__init__ assigns each attribute name (they are instance attributes, so not on the class)."""
    return lambda: set(names) <= set(vars(cls)["__init__"].__code__.co_names)


def _has(obj: Any, *names: str) -> Callable[[], bool]:
    return lambda: all(hasattr(obj, name) for name in names)


#: (what the engine relies on, a check that it holds in the installed openai-whisper)
ASSUMPTIONS: tuple[tuple[str, Callable[[], bool]], ...] = (
    (
        "whisper.transcribe keeps its loop state in locals `seek` and `all_segments`",
        lambda: (
            {"seek", "all_segments"}
            <= set(whisper.transcribe.__code__.co_varnames + whisper.transcribe.__code__.co_cellvars)
        ),
    ),
    (
        "whisper.transcribe accepts clip_timestamps, initial_prompt, word_timestamps and verbose",
        lambda: (
            {"clip_timestamps", "initial_prompt", "word_timestamps", "verbose"}
            <= set(inspect.signature(whisper.transcribe).parameters)
        ),
    ),
    (
        "whisper.transcribe takes its spectrogram from its module's log_mel_spectrogram(audio, ..., padding=N_SAMPLES)",
        lambda: (
            "log_mel_spectrogram" in whisper.transcribe.__code__.co_names
            and hasattr(importlib.import_module("whisper.transcribe"), "log_mel_spectrogram")
            and "log_mel_spectrogram(audio, model.dims.n_mels, padding=N_SAMPLES)"
            in inspect.getsource(whisper.transcribe)
        ),
    ),
    (
        "whisper._ALIGNMENT_HEADS is a dict of model names",
        lambda: isinstance(getattr(whisper, "_ALIGNMENT_HEADS", None), dict),
    ),
    ("whisper._MODELS is a dict of download URLs", lambda: isinstance(getattr(whisper, "_MODELS", None), dict)),
    ("Whisper.set_alignment_heads exists", _has(model.Whisper, "set_alignment_heads")),
    (
        "DecodingTask sets inference, decoder, sot_index, tokenizer, logit_filters, sample_len and n_ctx",
        _sets(
            decoding.DecodingTask,
            *("inference", "decoder", "sot_index", "tokenizer", "logit_filters", "sample_len", "n_ctx"),
        ),
    ),
    (
        "DecodingOptions has fp16, prompt, language, temperature and beam_size",
        lambda: (
            {"fp16", "prompt", "language", "temperature", "beam_size"}
            <= set(decoding.DecodingOptions.__dataclass_fields__)
        ),
    ),
    ("DecodingTask.run exists", _has(decoding.DecodingTask, "run")),
    ("DecodingTask._main_loop exists (a live decode's draft replaces it)", _has(decoding.DecodingTask, "_main_loop")),
    ("DecodingTask._get_audio_features exists", _has(decoding.DecodingTask, "_get_audio_features")),
    (
        "AudioEncoder has conv1, conv2, blocks and ln_post, and a positional_embedding buffer (a live buffer's"
        " short encoding)",
        lambda: (
            _sets(model.AudioEncoder, "conv1", "conv2", "blocks", "ln_post")()
            and "positional_embedding" in inspect.getsource(model.AudioEncoder.__init__)
        ),
    ),
    (
        "Inference has logits, rearrange_kv_cache and cleanup_caching",
        _has(decoding.Inference, "logits", "rearrange_kv_cache", "cleanup_caching"),
    ),
    ("BeamSearchDecoder keeps its inference", _sets(decoding.BeamSearchDecoder, "inference")),
    (
        "GreedyDecoder is built from (temperature, eot) and has update",
        lambda: (
            list(inspect.signature(decoding.GreedyDecoder).parameters) == ["temperature", "eot"]
            and hasattr(decoding.GreedyDecoder, "update")
        ),
    ),
    (
        "TextDecoder has token_embedding, positional_embedding, blocks, ln and mask",
        _sets(model.TextDecoder, "token_embedding", "positional_embedding", "blocks", "ln"),
    ),
    ("TextDecoder registers its causal mask buffer", lambda: "mask" in inspect.getsource(model.TextDecoder.__init__)),
    (
        "ResidualAttentionBlock has attn, attn_ln, cross_attn, cross_attn_ln, mlp and mlp_ln",
        _sets(model.ResidualAttentionBlock, "attn", "attn_ln", "cross_attn", "cross_attn_ln", "mlp", "mlp_ln"),
    ),
    (
        "MultiHeadAttention has query, key, value, out and n_head",
        _sets(model.MultiHeadAttention, "query", "key", "value", "out", "n_head"),
    ),
    (
        "whisper.model.Linear is a torch Linear (int8 swaps every torch Linear)",
        lambda: issubclass(model.Linear, torch.nn.Linear),
    ),
)


def check_whisper_internals() -> None:
    """Raise WhisperIncompatible naming every assumption the installed openai-whisper breaks."""
    broken = []
    for assumption, holds in ASSUMPTIONS:
        try:
            ok = holds()
        except (AttributeError, TypeError, ValueError, OSError):
            ok = False
        if not ok:
            broken.append(assumption)
    if broken:
        raise WhisperIncompatible(
            f"openai-whisper {getattr(whisper, '__version__', '?')} does not have what this service relies on: "
            + "; ".join(broken)
            + ". Install the version pinned in requirements.txt."
        )
