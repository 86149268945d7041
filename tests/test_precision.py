"""QUANTIZE=auto: the arithmetic measured fastest for the model on this CPU, kept for later starts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import whisper

from whisper_flask.engine import precision
from whisper_flask.engine.checkpoints import ensure_checkpoint


@pytest.mark.parametrize(
    ("model", "windows", "chosen"),
    [
        ("base", {"none": 5.2, "bf16": 2.3, "int8": 1.3}, "int8"),  # measured on an AMD EPYC without AMX
        ("base", {"none": 2.2, "bf16": 0.9, "int8": 1.4}, "bf16"),  # a CPU whose bf16 units win
        ("small", {"none": 1.0, "bf16": 0.2, "int8": 0.1}, "none"),  # neither's accuracy was measured: no timing
    ],
)
def test_auto_takes_the_fastest_arithmetic_measured_among_the_models_candidates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str, windows: dict[str, float], chosen: str
) -> None:
    measured: list[str] = []

    def window_seconds(loaded: object, arithmetic: str) -> float:
        measured.append(arithmetic)
        return windows[arithmetic]

    monkeypatch.setattr(precision, "_window_seconds", window_seconds)
    assert precision.measured_arithmetic(object(), model, tmp_path) == chosen  # type: ignore[arg-type]
    assert measured == (["none", "bf16", "int8"] if model == "base" else [])


def test_a_choice_is_kept_per_cpu_and_model_so_a_later_start_measures_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    windows = {"none": 2.0, "bf16": 1.0, "int8": 1.5}
    monkeypatch.setattr(precision, "_window_seconds", lambda model, arithmetic: windows[arithmetic])
    assert precision.measured_arithmetic(object(), "base", tmp_path) == "bf16"  # type: ignore[arg-type]
    kept = json.loads((tmp_path / precision.CACHE_NAME).read_text())
    assert [entry["chosen"] for entry in kept.values()] == ["bf16"]

    def measure_again(model: object, arithmetic: str) -> float:
        raise AssertionError("measured again")

    monkeypatch.setattr(precision, "_window_seconds", measure_again)
    assert precision.measured_arithmetic(object(), "base", tmp_path) == "bf16"  # type: ignore[arg-type]
    monkeypatch.setattr(precision, "_cpu_model", lambda: "another CPU (amx_bf16)")
    with pytest.raises(AssertionError, match="measured again"):  # another CPU measures for itself
        precision.measured_arithmetic(object(), "base", tmp_path)  # type: ignore[arg-type]


def test_the_real_models_work_is_timed_under_each_arithmetic_and_the_model_is_left_unquantized(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = whisper.load_model(str(ensure_checkpoint("base", model_dir, allow_download=False)))
    before = {name: type(module) for name, module in model.named_modules()}
    with caplog.at_level(logging.INFO, logger="whisper_flask.engine.precision"):
        chosen = precision.measured_arithmetic(model, "base", tmp_path)
    window = json.loads((tmp_path / precision.CACHE_NAME).read_text()).popitem()[1]["seconds"]
    assert set(window) == {"none", "bf16", "int8"} and all(seconds > 0 for seconds in window.values())
    assert chosen == min(window, key=window.get) and f"chosen: {chosen}" in caplog.text
    assert {name: type(module) for name, module in model.named_modules()} == before
