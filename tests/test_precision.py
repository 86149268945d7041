"""QUANTIZE=auto: each stage's arithmetic measured fastest for the model on this CPU, kept for later starts."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import whisper

from tests.helpers import FIXTURES, SPOKEN, needs_bf16_kernels
from whisper_flask.engine import precision, quantize
from whisper_flask.engine.checkpoints import ensure_checkpoint
from whisper_flask.engine.quantize import (
    Bf16Linear,
    FbgemmInt8Linear,
    Fp16Linear,
    Int8Linear,
    StageArithmetic,
    apply_arithmetic,
    fbgemm,
    onednn_bf16,
)

#: Seconds of a window's work by stage and arithmetic, as measured on an AMD EPYC with AVX512-BF16 (no AMX), but for
#: int8-fbgemm, not measured there: its figure is made up.
AMD = {"encoder": {"none": 0.66, "bf16": 0.40, "int8": 0.43, "int8-fbgemm": 0.45},
       "decoder": {"none": 3.6, "fp16": 1.4, "int8": 1.15}}  # fmt: skip
#: A CPU whose int8 kernels win the encoder too.
INT8_EVERYWHERE = {"encoder": {"none": 0.40, "bf16": 0.33, "int8": 0.29, "int8-fbgemm": 0.31},
                   "decoder": {"none": 1.0, "fp16": 0.7, "int8": 0.6}}  # fmt: skip
#: As measured on an AMD EPYC with AVX2 only: torch._int_mm has no fast kernel there, fbgemm's int8 has.
AVX2 = {"encoder": {"none": 0.67, "int8": 9.66, "int8-fbgemm": 0.52},
        "decoder": {"none": 2.40, "fp16": 0.90, "int8": 6.95}}  # fmt: skip


@pytest.mark.parametrize(
    ("model", "seconds", "bf16_kernels", "fbgemm_kernels", "chosen"),
    [
        ("base", AMD, True, True, StageArithmetic("bf16", "int8", "bf16")),
        ("base", INT8_EVERYWHERE, True, True, StageArithmetic("int8", "int8", "int8")),
        ("base", AMD, False, True, StageArithmetic("int8", "int8", "int8")),  # bf16 not measured where it is emulated
        ("base", AVX2, False, True, StageArithmetic("int8-fbgemm", "fp16", "none")),  # live sessions never int8-fbgemm
        ("base", AVX2, False, False, StageArithmetic("none", "none", "none")),
        ("small", AVX2, False, True, StageArithmetic("none", "fp16", "none")),  # fp16 loses nothing: for any model
        ("small", AMD, True, False, StageArithmetic("none", "none", "none")),  # int8 and bf16 unmeasured for accuracy
    ],
)
def test_auto_takes_each_stages_fastest_arithmetic_among_the_models_candidates(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    model: str,
    seconds: dict[str, dict[str, float]],
    bf16_kernels: bool,
    fbgemm_kernels: bool,
    chosen: StageArithmetic,
) -> None:
    measured: list[tuple[str, str]] = []

    def stage_seconds(loaded: object, stage: str, arithmetic: str) -> float:
        measured.append((stage, arithmetic))
        return seconds[stage][arithmetic]

    monkeypatch.setattr(precision, "_stage_seconds", stage_seconds)
    monkeypatch.setattr(precision, "onednn_bf16", lambda: bf16_kernels)
    monkeypatch.setattr(precision, "fbgemm", lambda: fbgemm_kernels)
    assert precision.measured_arithmetic(object(), model, tmp_path) == chosen  # type: ignore[arg-type]
    base = model == "base"
    encoder = ["none", *(["bf16"] if base and bf16_kernels else []), *(["int8"] if base else []),
               *(["int8-fbgemm"] if base and fbgemm_kernels else [])]  # fmt: skip
    decoder = ["none", *(["fp16"] if fbgemm_kernels else []), *(["int8"] if base else [])]
    every = [(stage, arithmetic) for stage, each in (("encoder", encoder), ("decoder", decoder)) if len(each) > 1
             for arithmetic in each]  # fmt: skip
    assert measured == every  # never bf16 in the decoder nor fp16 in the encoder: see quantize.py


def test_the_timings_are_kept_per_cpu_model_stage_and_candidates_so_a_later_start_measures_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(precision, "_stage_seconds", lambda model, stage, kind: AVX2[stage][kind])
    monkeypatch.setattr(precision, "onednn_bf16", lambda: False)
    monkeypatch.setattr(precision, "fbgemm", lambda: True)
    chosen = StageArithmetic("int8-fbgemm", "fp16", "none")  # the live encoder's from the timings kept too
    assert precision.measured_arithmetic(object(), "base", tmp_path) == chosen  # type: ignore[arg-type]
    kept = json.loads((tmp_path / precision.CACHE_NAME).read_text())
    assert {key.rsplit("|", 1)[1]: entry["seconds"] for key, entry in kept.items()} == {
        "base encoder (none, int8, int8-fbgemm)": AVX2["encoder"], "base decoder (none, fp16, int8)": AVX2["decoder"],
    }  # fmt: skip

    def measure_again(model: object, stage: str, arithmetic: str) -> float:
        raise AssertionError("measured again")

    monkeypatch.setattr(precision, "_stage_seconds", measure_again)
    assert precision.measured_arithmetic(object(), "base", tmp_path) == chosen  # type: ignore[arg-type]
    monkeypatch.setattr(precision, "fbgemm", lambda: False)
    with pytest.raises(AssertionError, match="measured again"):  # other candidates are measured afresh
        precision.measured_arithmetic(object(), "base", tmp_path)  # type: ignore[arg-type]
    monkeypatch.setattr(precision, "fbgemm", lambda: True)
    monkeypatch.setattr(precision, "_cpu_model", lambda: "another CPU (amx_bf16)")
    with pytest.raises(AssertionError, match="measured again"):  # another CPU measures for itself
        precision.measured_arithmetic(object(), "base", tmp_path)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "linear", [pytest.param(Bf16Linear, marks=needs_bf16_kernels), Fp16Linear, Int8Linear, FbgemmInt8Linear]
)
def test_each_arithmetics_linear_layer_gives_fp32_close_to_the_fp32_layer(linear: type[torch.nn.Module]) -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(512, 2048)
    x = torch.randn(7, 512)
    with torch.no_grad():
        got, expected = linear(layer.weight, layer.bias)(x), layer(x)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert float((got - expected).norm() / expected.norm()) < 0.02


@pytest.mark.parametrize(
    ("setting", "stages"),
    [
        ("none", ("none", "none", "none")),
        ("int8", ("int8", "int8", "int8")),
        ("bf16", ("bf16", "none", "bf16")),
        ("fp16", ("none", "fp16", "none")),
    ],
)
def test_an_explicit_setting_is_bf16_for_the_encoders_only_and_fp16_for_the_decoder_only(
    setting: str, stages: tuple[str, str, str]
) -> None:
    assert StageArithmetic.chosen(setting) == StageArithmetic(*stages)


@pytest.mark.parametrize(
    ("setting", "probe", "warning"),
    [("bf16", "onednn_bf16", "no bf16 matrix kernels"), ("fp16", "fbgemm", "no fbgemm fp16 kernels")],
)
def test_an_explicit_setting_runs_fp32_with_a_warning_on_a_cpu_without_its_kernels(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, setting: str, probe: str, warning: str
) -> None:
    monkeypatch.setattr(quantize, probe, lambda: False)
    assert quantize.choose_precision(setting, "cpu") == "none"
    assert warning in caplog.text
    assert quantize.choose_precision("int8", "cpu") == "int8"


@pytest.mark.parametrize(
    ("layer", "probe"), [(Bf16Linear, onednn_bf16), (Fp16Linear, fbgemm), (FbgemmInt8Linear, fbgemm)]
)
def test_a_kernels_probe_says_what_building_its_layer_finds(
    layer: type[torch.nn.Module], probe: Callable[[], bool]
) -> None:
    try:
        layer(torch.zeros(8, 8), None)
    except RuntimeError:
        assert not probe()
    else:
        assert probe()


def test_fp16_layers_give_a_checkpoints_fp32_results_whatever_rows_are_beside(model_dir: Path) -> None:
    model = whisper.load_model(str(ensure_checkpoint("tiny.en", model_dir, allow_download=False)))
    layer = model.decoder.blocks[0].mlp[0]
    assert torch.equal(layer.weight, layer.weight.half().float())  # Whisper's checkpoints store fp16
    x = torch.randn(8, 1, layer.in_features, generator=torch.Generator().manual_seed(0))
    fp16 = Fp16Linear(layer.weight, layer.bias)
    with torch.no_grad():
        got, alone, expected = fp16(x), fp16(x[:1]), layer(x)
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-5
    assert float((alone - got[:1]).abs().max() / expected.abs().max()) < 1e-5


@pytest.mark.parametrize(
    ("encoder", "decoder", "live_encoder"),
    [
        pytest.param(Bf16Linear, Int8Linear, Bf16Linear, marks=needs_bf16_kernels),
        (Int8Linear, Fp16Linear, Int8Linear),
        (FbgemmInt8Linear, Fp16Linear, torch.nn.Linear),
    ],
)
def test_each_stage_gets_its_own_arithmetic_and_live_sessions_an_encoder_of_theirs_where_it_differs(
    model_dir: Path, encoder: type[torch.nn.Module], decoder: type[torch.nn.Module], live_encoder: type[torch.nn.Module]
) -> None:
    checkpoint = str(ensure_checkpoint("tiny.en", model_dir, allow_download=False))
    model, fp32 = whisper.load_model(checkpoint), whisper.load_model(checkpoint)
    named = {Bf16Linear: "bf16", Fp16Linear: "fp16", Int8Linear: "int8", FbgemmInt8Linear: "int8-fbgemm",
             torch.nn.Linear: "none"}  # fmt: skip
    applied = apply_arithmetic(model, StageArithmetic(named[encoder], named[decoder], named[live_encoder]))
    layers = (*named, whisper.model.Linear)
    assert {type(module) for module in model.encoder.modules()} & set(layers) == {encoder}
    assert {type(module) for module in model.decoder.modules()} & set(layers) == {decoder}
    assert isinstance(applied.projection, decoder)
    assert not any(isinstance(module, torch.nn.Linear) for module in model.modules())
    if live_encoder is encoder:
        assert applied.live_encoder is model.encoder
    else:  # a copy of the fp32 encoder, loaded as it was
        mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(whisper.load_audio(str(FIXTURES / "fox.wav"))))[None]
        with torch.no_grad():
            assert torch.equal(applied.live_encoder(mel), fp32.encoder(mel))
    text = whisper.transcribe(model, str(FIXTURES / "fox.wav"), fp16=False, temperature=0.0)["text"].lower()
    assert all(words in text for words in SPOKEN["fox.wav"]), text


def test_the_real_models_stages_are_timed_under_each_arithmetic_and_the_model_is_left_as_it_was(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = whisper.load_model(str(ensure_checkpoint("base", model_dir, allow_download=False)))
    before = {name: type(module) for name, module in model.named_modules()}
    with caplog.at_level(logging.INFO, logger="whisper_flask.engine.precision"):
        chosen = precision.measured_arithmetic(model, "base", tmp_path)
    stored = json.loads((tmp_path / precision.CACHE_NAME).read_text())
    kept = {key.rsplit("|", 1)[1]: entry for key, entry in stored.items()}
    for stage in ("encoder", "decoder"):
        (seconds,) = [entry["seconds"] for name, entry in kept.items() if name.startswith(f"base {stage} (")]
        bf16 = stage == "encoder" and onednn_bf16()  # never in the decoder, nor where bf16 has no kernels
        fp16 = stage == "decoder" and fbgemm()  # never in the encoder
        fbgemm_int8 = stage == "encoder" and fbgemm()  # never in the decoder
        assert set(seconds) == {"none", "int8", *(["bf16"] if bf16 else []), *(["fp16"] if fp16 else []),
                                *(["int8-fbgemm"] if fbgemm_int8 else [])}  # fmt: skip
        assert all(value > 0 for value in seconds.values())
        assert getattr(chosen, stage) == min(seconds, key=seconds.get)
        if stage == "encoder":
            live = {arithmetic: value for arithmetic, value in seconds.items() if arithmetic != "int8-fbgemm"}
            assert chosen.live_encoder == min(live, key=live.get)
    assert "arithmetic for base encoder (none, " in caplog.text
    assert {name: type(module) for name, module in model.named_modules()} == before
