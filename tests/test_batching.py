"""Batched decoding on the real tiny.en model: each window decodes as it would alone."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import whisper

from tests.conftest import FIXTURES, SPOKEN
from whisper_flask.batching import decode_windows, whisper_projection
from whisper_flask.quantize import Int8Linear, quantize_int8


@pytest.fixture(scope="module")
def tiny(model_dir: Path) -> whisper.Whisper:
    """The fp32 tiny.en model (module-wide: tests must not change it)."""
    return whisper.load_model(str(model_dir / "tiny.en.pt"), device="cpu")


@pytest.fixture(scope="module")
def mels() -> list[torch.Tensor]:
    """One 30-second window per spoken fixture."""
    return [whisper.log_mel_spectrogram(whisper.pad_or_trim(whisper.load_audio(str(FIXTURES / n)))) for n in SPOKEN]


OPTIONS = whisper.DecodingOptions(language="en", fp16=False)


@pytest.mark.parametrize(
    "options",
    [OPTIONS, dataclasses.replace(OPTIONS, without_timestamps=True)],
    ids=["timestamps", "no-timestamps"],
)
def test_windows_with_different_prompts_decode_in_one_batch_as_each_alone(
    tiny: whisper.Whisper, mels: list[torch.Tensor], options: whisper.DecodingOptions
) -> None:
    tokenizer = whisper.tokenizer.get_tokenizer(False)
    # Prompts of different lengths (and none) make the rows padded by different amounts.
    prompts = [None, tokenizer.encode(" The quick brown fox."), [], tokenizer.encode(" " + "word " * 40)]
    alone = [
        whisper.decode(tiny, mel, dataclasses.replace(options, prompt=prompt))
        for mel, prompt in zip(mels, prompts, strict=True)
    ]
    batch = decode_windows(tiny, mels, prompts, options, whisper_projection(tiny))
    assert [result.tokens for result in batch] == [result.tokens for result in alone]
    assert [result.text for result in batch] == [result.text for result in alone]
    assert [r.avg_logprob for r in batch] == pytest.approx([r.avg_logprob for r in alone], rel=1e-4)
    assert [r.no_speech_prob for r in batch] == pytest.approx([r.no_speech_prob for r in alone], rel=1e-3, abs=1e-6)


def test_a_window_decoded_alone_follows_whisper_with_beam_search_and_sampling(
    tiny: whisper.Whisper, mels: list[torch.Tensor]
) -> None:
    for options in (dataclasses.replace(OPTIONS, beam_size=3), dataclasses.replace(OPTIONS, temperature=0.6)):
        torch.manual_seed(7)
        expected = whisper.decode(tiny, mels[1], options)
        torch.manual_seed(7)
        [result] = decode_windows(tiny, [mels[1]], [None], options, whisper_projection(tiny))
        assert result.tokens == expected.tokens, options


def test_encoder_output_can_stand_for_the_window(tiny: whisper.Whisper, mels: list[torch.Tensor]) -> None:
    [first] = decode_windows(tiny, mels[:1], [None], OPTIONS, whisper_projection(tiny))
    [again] = decode_windows(tiny, [first.audio_features], [None], OPTIONS, whisper_projection(tiny))
    assert again.tokens == first.tokens


def test_int8_linear_rows_do_not_depend_on_each_other() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48)
    rows = torch.randn(5, 64) * torch.tensor([1.0, 30.0, 0.01, 5.0, 1.0])[:, None]
    int8 = Int8Linear(layer.weight, layer.bias)
    together = int8(rows)
    assert all(torch.equal(together[i], int8(rows[i : i + 1])[0]) for i in range(len(rows)))
    expected = layer(rows)
    assert torch.allclose(together, expected, rtol=0.05, atol=0.05 * float(expected.abs().max()))


def test_int8_model_still_hears_the_words(model_dir: Path, mels: list[torch.Tensor]) -> None:
    model = whisper.load_model(str(model_dir / "tiny.en.pt"), device="cpu")
    project = quantize_int8(model)
    assert not any(isinstance(module, torch.nn.Linear) for module in model.modules())
    results = decode_windows(model, mels, [None] * len(mels), OPTIONS, project)
    for result, phrases in zip(results, SPOKEN.values(), strict=True):
        assert all(phrase.lower() in result.text.lower() for phrase in phrases), result.text
